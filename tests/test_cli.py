"""Tests for the ``drnb`` command, called in-process through ``drnb.cli.main``.

``reproduce`` is only tested for the errors it must raise before anything runs: those tests
make starting a run or a notebook fail the test, so they can never train.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import drnb.reproduce
from drnb.cli import main
from drnb.datasets import DATASETS
from drnb.profiles import PROFILES


def write_aptos(root, write_fundus, rows, images=None):
    """APTOS 2019 layout: train.csv (id_code,diagnosis) and train_images/<id>.png."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},{g}\n" for i, g in rows))
    for image_id in images if images is not None else [r[0] for r in rows]:
        write_fundus(root / "train_images" / f"{image_id}.png")
    return root


# --------------------------------------------------------------------------------------------
# drnb datasets / profiles
# --------------------------------------------------------------------------------------------


def test_datasets_lists_every_registered_dataset(capsys, isolated_drnb_dirs):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name, info in DATASETS.items():
        assert f"{name}\n  {info.title}" in out
        assert info.layout in out and info.licence in out
    assert str(isolated_drnb_dirs[0] / "idrid") in out  # the default folder


def test_profiles_prints_every_profile(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in PROFILES:
        assert f"# {name}\n" in out
    assert '"pretext_epochs"' in out


def test_profiles_prints_one_profile(capsys):
    assert main(["profiles", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# smoke\n") and "# paper" not in out
    assert f'"image_size": {PROFILES["smoke"].image_size}' in out


def test_profiles_unknown_name(capsys):
    assert main(["profiles", "fast"]) == 2
    captured = capsys.readouterr()
    assert "drnb profiles: error: profile='fast'" in captured.err
    assert "smoke" in captured.err


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: drnb" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# drnb inspect
# --------------------------------------------------------------------------------------------


def test_inspect_reports_counts_and_no_problems(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", 2), ("c", 2), ("d", 4)])
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "aptos2019: 4 images" in out
    for line in ("grade 0 (no DR): 1", "grade 1 (mild): 0", "grade 2 (moderate): 2", "grade 4 (proliferative): 1"):
        assert line in out
    assert "given splits: none" in out
    assert "problems: 0" in out


def test_inspect_names_missing_and_unreadable_files(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", 1), ("c", 3)], images=["a", "b"])
    (root / "train_images" / "b.png").write_bytes(b"not a png at all" * 8)
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "aptos2019: 2 images" in out  # the missing one is dropped, the unreadable one counted
    assert "problems: 2" in out
    assert "c.png" in out and str(root / "train_images" / "b.png") in out


def test_inspect_checks_an_unlabelled_archive_source_by_source(tmp_path, write_fundus, capsys):
    write_fundus(tmp_path / "archive" / "clinic" / "a.jpg")
    write_fundus(tmp_path / "archive" / "b.png")
    (tmp_path / "archive" / "clinic" / "broken.png").write_bytes(b"not a png at all" * 8)
    root = write_aptos(tmp_path / "aptos", write_fundus, [("x", 0), ("y", 2)])
    assert main(["inspect", "--pretext-images", f"{tmp_path / 'archive'},aptos2019:{root}"]) == 1
    out = capsys.readouterr().out
    assert "pretext archive: 5 photographs" in out and "  archive: 3" in out and "  aptos2019: 2" in out
    assert "problems: 1" in out and "broken.png" in out
    assert main(["inspect"]) == 2 and "--dataset NAME" in capsys.readouterr().err
    assert main(["inspect", "--pretext-images", str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("photograph", ["all_black", "one_pixel", "zero_bytes", "truncated", "flat_white"])
def test_inspect_finds_what_preprocessing_would_refuse(tmp_path, write_fundus, write_image, capsys, photograph):
    """inspect checks every photograph as preprocessing does, so a set it passes preprocesses."""
    from drnb.datasets import load_dataset
    from drnb.preprocessing import PreprocessConfig, preprocess_table

    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", 1), ("c", 2)])
    bad = root / "train_images" / "b.png"
    if photograph == "all_black":
        write_image(bad, np.zeros((48, 64, 3), np.uint8))
    elif photograph == "one_pixel":
        write_image(bad, np.full((1, 1, 3), 200, np.uint8))
    elif photograph == "flat_white":  # what a 16-bit photograph clipped to 8 bits looks like
        write_image(bad, np.full((48, 64, 3), 255, np.uint8))
    elif photograph == "zero_bytes":
        bad.write_bytes(b"")
    else:  # cut short, as by a full disk or an interrupted copy
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "problems: 1" in out and str(bad) in out
    with pytest.raises(ValueError, match=re.escape(str(bad))):  # what reproduce would then meet
        preprocess_table(load_dataset("aptos2019", root), PreprocessConfig(size=32), cache_dir=tmp_path / "cache", progress=False)


def test_inspect_no_decode_skips_opening_images(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", 1)])
    (root / "train_images" / "b.png").write_bytes(b"not a png at all" * 8)
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root), "--no-decode"]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_inspect_csv_layout_flags(tmp_path, write_fundus, capsys):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "grades.csv").write_text("file,level\n7_left,1\n7_right,3\n")
    for name in ("7_left", "7_right"):
        write_fundus(root / "pics" / f"{name}.jpg")
    argv = [
        "inspect", "--dataset", "csv", "--data-dir", str(root), "--label-file", "grades.csv",
        "--image-dir", "pics", "--id-column", "file", "--grade-column", "level", "--suffix", ".jpg",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "csv: 2 images" in out and "grade 3 (severe): 1" in out
    assert "patients: 1 (2 images with a patient id)" in out


def test_inspect_patient_column(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", 2), ("c", 2)])
    (root / "train.csv").write_text("id_code,diagnosis,patient\na,0,x\nb,2,x\nc,2,\n")
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root), "--patient-column", "patient"]) == 0
    assert "patients: 1 (2 images with a patient id)" in capsys.readouterr().out


def test_inspect_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["inspect", "--dataset", "eyepacs2015", "--data-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drnb inspect: error: ")
    assert str(missing) in err and "trainLabels.csv" in err


def test_inspect_bad_grade_names_file_and_row(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0), ("b", "x")])
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(root / "train.csv") in err and "row 3" in err and "'x'" in err


def test_inspect_leaves_the_drnb_logger_as_it_was(tmp_path, write_fundus, capsys):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", 0)])
    before = list(logging.getLogger("drnb").handlers)
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(root), "--no-decode"]) == 0
    assert logging.getLogger("drnb").handlers == before


# --------------------------------------------------------------------------------------------
# drnb reproduce: argument errors, before anything runs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_may_run(monkeypatch, isolated_drnb_dirs, tmp_path):
    """Fail the test if reproduce gets as far as creating a run folder or executing a notebook."""
    import papermill

    def forbidden(*args, **kwargs):
        raise AssertionError("reproduce went past its argument checks")

    monkeypatch.setattr(drnb.reproduce, "open_run", forbidden)
    monkeypatch.setattr(papermill, "execute_notebook", forbidden)
    return tmp_path / "run"


REPRODUCE_ERRORS = {
    "unknown_profile": (["--profile", "fast"], ["profile='fast'", "smoke", "quick", "paper"]),
    "unknown_dataset": (["--profile", "smoke", "--dataset", "aptos"], ["dataset='aptos'", "aptos2019"]),
    "unknown_setting": (["--profile", "smoke", "--set", "epochs=3"], ["--set epochs", "no such setting", "pretext_epochs"]),
    "set_without_value": (["--profile", "smoke", "--set", "pretext_epochs"], ["'pretext_epochs'", "key=value"]),
    "set_wrong_type": (["--profile", "smoke", "--set", "pretext_epochs=many"], ["pretext_epochs", "'many'", "int"]),
    "fraction_zero": (["--profile", "smoke", "--set", "fractions=0"], ["fractions", "0.0", "(0, 1]"]),
    "fraction_above_one": (["--profile", "smoke", "--set", "fractions=0.5,1.5"], ["fractions", "1.5", "(0, 1]"]),
    "fractions_empty": (["--profile", "smoke", "--set", "fractions="], ["fractions=()", "at least one labelled fraction"]),
    "image_too_small": (["--profile", "smoke", "--set", "image_size=8"], ["image_size=8", "[16, 2048]"]),
    "seed_negative": (["--profile", "smoke", "--set", "seed=-1"], ["seed must be an integer in 0..", "got -1"]),
    "one_fold": (["--profile", "smoke", "--set", "folds=1", "--set", "repetitions=1"], ["folds must be an integer >= 2", "got 1"]),
    "no_resamples": (["--profile", "smoke", "--set", "bootstrap_resamples=0"], ["bootstrap_resamples", ">= 1", "got 0"]),
    "empty_data_dir": (["--profile", "smoke", "--data-dir", ""], ["--data-dir ''", "expected a value"]),
    "unknown_kernel": (["--profile", "smoke", "--kernel", "no-such-kernel"], ["--kernel no-such-kernel", "no such Jupyter kernel"]),
}


@pytest.mark.parametrize("case", sorted(REPRODUCE_ERRORS))
def test_reproduce_rejects_bad_arguments(case, nothing_may_run, capsys):
    had_tensorflow = "tensorflow" in sys.modules
    argv, expected = REPRODUCE_ERRORS[case]
    assert main(["reproduce", *argv, "--out", str(nothing_may_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drnb reproduce: error: ")
    for text in expected:
        assert text in err
    assert not nothing_may_run.exists()
    if not had_tensorflow:
        assert "tensorflow" not in sys.modules, "argument checks must not import TensorFlow"


@pytest.mark.parametrize("out", ["empty", "a_file", "inside_a_file"])
def test_reproduce_refuses_an_out_that_is_not_a_folder_to_write(out, nothing_may_run, capsys):
    """``--out ''`` (an unset shell variable) is not the default folder; a file is not a folder."""
    existing = nothing_may_run.parent / "notes.txt"
    existing.write_text("not a run folder")
    given = {"empty": "", "a_file": str(existing), "inside_a_file": str(existing / "run")}[out]
    assert main(["reproduce", "--profile", "smoke", "--out", given]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drnb reproduce: error: --out ") and err.count("\n") == 1
    assert ("expected a value" in err) if out == "empty" else f"{existing} is a file, not a folder" in err
    assert existing.read_text() == "not a run folder"


def test_reproduce_refuses_a_cache_it_cannot_write(nothing_may_run, isolated_drnb_dirs, monkeypatch, capsys):
    blocker = nothing_may_run.parent / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("DRNB_CACHE", str(blocker / "cache"))
    assert main(["reproduce", "--profile", "smoke", "--out", str(nothing_may_run)]) == 2
    err = capsys.readouterr().err
    assert f"preprocessing cache {blocker / 'cache'}" in err and "set DRNB_CACHE" in err
    assert not nothing_may_run.exists()


@pytest.mark.parametrize("data", ["a_file", "no_layout", "missing_images"])
def test_reproduce_refuses_a_data_dir_without_the_layout(data, tmp_path, write_fundus, nothing_may_run, capsys):
    folder = tmp_path / "aptos"
    if data == "a_file":
        folder.write_text("")
    elif data == "no_layout":
        (folder / "photos").mkdir(parents=True)
    else:
        write_aptos(folder, write_fundus, [("a", 0), ("b", 1)], images=["a"])
    argv = ["reproduce", "--profile", "smoke", "--dataset", "aptos2019", "--data-dir", str(folder)]
    assert main([*argv, "--out", str(nothing_may_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"drnb reproduce: error: --data-dir {folder}") and err.count("\n") == 1
    assert {"a_file": "is a file", "no_layout": "train.csv", "missing_images": "b.png"}[data] in err
    assert not nothing_may_run.exists()


def test_reproduce_names_a_damaged_profile_json(tmp_path, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "profile.json").write_text('{"name": "smoke", "seed": ')
    assert main(["reproduce", "--profile", "smoke", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'profile.json'} is damaged: not valid JSON" in err and err.count("\n") == 1


def test_inspect_refuses_a_data_dir_that_is_a_file(tmp_path, capsys):
    folder = tmp_path / "aptos"
    folder.write_text("")
    assert main(["inspect", "--dataset", "aptos2019", "--data-dir", str(folder)]) == 2
    assert f"{folder} for dataset 'aptos2019' is a file" in capsys.readouterr().err


def test_reproduce_refuses_a_run_folder_made_by_another_profile(tmp_path, monkeypatch, capsys):
    import papermill

    from drnb.runs import open_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a notebook ran in a folder made by another profile")

    monkeypatch.setattr(papermill, "execute_notebook", forbidden)
    run = tmp_path / "run"
    open_run(run, "smoke")
    before = (run / "profile.json").read_text()
    assert main(["reproduce", "--profile", "quick", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "made by profile 'smoke', not 'quick'" in err and "--profile smoke" in err
    assert (run / "profile.json").read_text() == before


def test_reproduce_missing_data_dir(tmp_path, nothing_may_run, capsys):
    missing = tmp_path / "no-such-folder"
    argv = ["reproduce", "--profile", "smoke", "--dataset", "aptos2019", "--data-dir", str(missing)]
    assert main([*argv, "--out", str(nothing_may_run)]) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {missing} does not exist" in err
    assert "train.csv" in err  # the layout that was expected
    assert not nothing_may_run.exists()


def test_reproduce_real_dataset_without_data_dir(isolated_drnb_dirs, nothing_may_run, capsys):
    argv = ["reproduce", "--profile", "smoke", "--dataset", "idrid", "--out", str(nothing_may_run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no data folder for dataset 'idrid'" in err and "--data-dir" in err
    assert str(isolated_drnb_dirs[0] / "idrid") in err
    assert not nothing_may_run.exists()


@pytest.mark.parametrize("which", ["ours", "gone", "another_venv"])
def test_default_kernel_is_drnb_only_when_it_runs_this_interpreter(tmp_path, monkeypatch, which):
    import json

    kernel_dir = tmp_path / "kernels" / "drnb"
    kernel_dir.mkdir(parents=True)
    executable = sys.executable
    if which == "gone":
        executable = str(tmp_path / "gone" / ".venv" / "bin" / "python")
    elif which == "another_venv":  # another venv's python: a link to the same base interpreter
        (tmp_path / "other").mkdir()
        executable = str(tmp_path / "other" / "python")
        os.symlink(os.path.realpath(sys.executable), executable)
    ours = which == "ours"
    spec = {"argv": [executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "drnb", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    assert drnb.reproduce.default_kernel() == ("drnb" if ours else "python3")


def test_tensorflow_log_is_hidden_unless_drnb_tf_log_asks_for_it():
    # Imports TensorFlow and runs ops that make it log (CUDA probing, oneDNN fallbacks).
    code = "import drnb.models, tensorflow as tf; tf.image.rot90(tf.zeros((1, 4, 4, 3), tf.int32)).numpy()"
    env = {key: value for key, value in os.environ.items() if key not in ("DRNB_TF_LOG", "TF_CPP_MIN_LOG_LEVEL")}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "DRNB_TF_LOG": "1"}, capture_output=True, text=True, check=True)
    assert loud.stderr.strip(), "with DRNB_TF_LOG=1 TensorFlow's own log lines should reach stderr"


def test_reproduce_runs_demo_by_default_and_predicts_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(drnb.reproduce, "reproduce", lambda profile, **options: calls.append((profile, options["predict"])) or drnb.reproduce.ReproduceReport(run=None))
    assert main(["reproduce"]) == 0 and main(["reproduce", "--profile", "smoke", "--no-prediction"]) == 0
    assert calls == [("demo", True), ("smoke", False)]

"""The notebooks: their shape, and the whole chain through papermill with the smoke profile."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from drnb.metrics import ONE_CLASS_ONLY
from drnb.profiles import PROFILES
from drnb.reproduce import NOTEBOOKS, kernel_manager_class, reproduce

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS.values()))
def test_notebook_is_thin_narrated_parameterised_and_stripped(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)  # papermill logs an invalid notebook as an ERROR on every run
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and "papermill" in first.source and "Writes" in first.source
    # A short opening; the explanations sit beside the steps they explain.
    assert len(first.source.split()) <= 150, f"the opening cell has {len(first.source.split())} words"
    for before, cell in zip(notebook.cells, notebook.cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"no markdown says what this step does:\n{cell.source[:200]}"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    # drnb is imported before TensorFlow, so that TensorFlow's C++ start-up log stays hidden.
    code = [cell for cell in notebook.cells if cell.cell_type == "code" and cell is not tagged[0]]
    assert code[0].source.startswith("import drnb"), "the first code cell after the parameters imports drnb first"
    for line in tagged[0].source.splitlines():
        assert "#" in line, f"parameter without a comment: {line!r}"
        # papermill skips a parameter line holding more than one "=", even inside the comment.
        assert line.count("=") == 1, f"papermill cannot parse {line!r}"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit notebooks with outputs stripped"
            assert "def " not in cell.source and "sys.path" not in cell.source
            for setting in re.findall(r"\bprofile\.(\w+)", cell.source):
                assert hasattr(PROFILES["smoke"], setting), f"profile.{setting}: no such setting"
    assert notebook.metadata.kernelspec.name == "drnb"


def is_png(path):
    data = Path(path).read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


@pytest.mark.notebooks
@pytest.mark.slow
def test_smoke_reproduction_reports_failures_keeps_results_and_resumes(tmp_path, capfd):
    """One failing fraction, then a rerun that redoes only what failed (about 3 minutes on 2 cores)."""
    broken = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, broken)
    finetune = nbformat.read(broken / NOTEBOOKS["finetune"], as_version=4)
    after_parameters = next(i for i, cell in enumerate(finetune.cells) if "parameters" in cell.metadata.get("tags", [])) + 1
    finetune.cells.insert(after_parameters, nbformat.v4.new_code_cell('if fraction == 0.25:\n    raise RuntimeError("injected failure")'))
    nbformat.write(finetune, broken / NOTEBOOKS["finetune"])
    out = tmp_path / "run"
    lines = []
    report = reproduce("smoke", out=str(out), notebooks=broken, kernel="python3", log=lines.append)

    assert [label for label, _, _ in report.failed] == ["03_finetune_fractions (fraction=0.25)"]
    # Before the first notebook, the sweep's time on this machine, measured and predicted; after the last, the time it took.
    prediction = next(line for line in lines if line.startswith("predicted on this machine: "))
    assert lines.index(prediction) < next(i for i, line in enumerate(lines) if "01_data_exploration" in line)
    assert report.predicted_seconds > 0 and lines[-1].startswith("took ") and "(predicted " in lines[-1]
    failed_notebook = report.failed[0][1]
    assert failed_notebook.exists() and "injected failure" in failed_notebook.read_text()
    assert any("FAILED" in line and str(failed_notebook) in line for line in lines)
    finished = sorted(out.glob("finetune/*/*/fraction_1/repetition_*/metrics.json"))
    assert len(finished) == 2 * 2 * 2  # both protocols, rotation and scratch, 2 repetitions: the other fraction is intact
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    assert len(list((out / "features").glob("features_*.npz"))) == 1 + 2  # the pretext's encoder, a fresh one per repetition

    lines.clear()
    report = reproduce("smoke", out=str(out), kernel="python3", log=lines.append)

    assert report.ok, report.failed
    assert not (out / "features").exists() and any("removed" in line and "features" in line for line in lines)
    assert report.predicted_seconds is None  # a resumed sweep is not predicted
    # The work the prediction counts is the work the runs did: their steps in whole batches.
    assert_planned_work_is_the_runs(out)
    assert set(report.skipped) == {"01_data_exploration", "02_rotation_pretext", "03_finetune_fractions (fraction=1.0)"}
    assert {path: path.stat().st_mtime_ns for path in finished} == stamps  # finished results untouched
    table = pd.read_csv(out / "table.csv")
    assert set(zip(table["protocol"], table["method"], table["train_split"])) == {
        (p, m, s) for p in ("finetune", "linear") for m in ("rotation", "scratch") for s in (25, 100)
    }
    assert np.isfinite(table[["qwk_min", "qwk_avg", "qwk_max"]].to_numpy()).all()
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 2 * 2 * 2 and np.isfinite(results["qw_kappa"]).all()
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(zip(comparison["protocol"], comparison["train_split"])) == {(p, s) for p in ("finetune", "linear") for s in (25, 100)}
    format_only = pd.read_csv(out / "data" / "format_only.csv")  # notebook 01's floor, one row per repetition
    assert len(format_only) == 2 and json.loads((out / "data" / "summary.json").read_text())["format_only_qw_kappa"] == (
        pytest.approx(format_only["qw_kappa"].mean())
    )
    assert is_png(out / "kappa_vs_fraction.png")
    # Referable DR beside kappa: finite where a test fold holds both classes, said undefined where it does not.
    assert {"auc_min", "auc_avg", "auc_max", "sensitivity_avg", "specificity_avg"} <= set(table.columns)
    both = (results["n_referable"] > 0) & (results["n_non_referable"] > 0)
    figures = results[["referable_auc", "referable_sensitivity", "referable_specificity", "referable_threshold"]]
    assert np.isfinite(figures[both].to_numpy()).all()
    assert results.loc[~both, "referable_note"].fillna("").astype(str).str.startswith(ONE_CLASS_ONLY).all()
    assert results.loc[~both, "referable_auc"].isna().all()
    assert ((results["referable_auc"] >= 0) & (results["referable_auc"] <= 1))[both].all()
    assert {"auc_pooled_difference", "auc_ci_low", "auc_ci_high", "auc_verdict"} <= set(comparison.columns)
    assert is_png(out / "referable_auc_vs_fraction.png")
    assert "| method |" in (out / "table.md").read_text()
    assert json.loads((out / "profile.json").read_text())["name"] == "smoke"
    assert any("table:" in line for line in lines)
    captured = capfd.readouterr()
    if os.name == "posix":  # kernels talk over Unix sockets, so ipykernel has no plain-TCP warning to give
        assert "without encryption" not in captured.err
    # drnb's lines only: neither TensorFlow's C++ log nor a kernel's shutdown noise.
    for noise in ("absl::InitializeLog", "oneDNN", "cuda", "KeyboardInterrupt"):
        assert noise not in captured.out + captured.err, noise


def assert_planned_work_is_the_runs(out):
    from drnb.finetune import FinetuneSession
    from drnb.runs import load_images, open_run
    from drnb.workload import planned_work

    _, profile = open_run(out, create=False)
    images, table = load_images(profile, log=lambda line: None)
    work = planned_work(profile, FinetuneSession(images, table, profile, log=lambda line: None), len(images), walkthrough=False)
    runs = [json.loads(path.read_text()) for path in out.glob("finetune/*/*/fraction_*/repetition_*/metrics.json")]
    assert len(runs) == work["runs"]
    trained = sum(run["steps"] * min(profile.finetune_batch_size, run["n_train"]) for run in runs)
    assert trained == work["finetune_full"] + work["finetune_head"] > 0


@pytest.mark.skipif(os.name != "posix", reason="the ipc transport needs Unix domain sockets")
def test_kernels_are_started_on_the_ipc_transport():
    from jupyter_core.paths import jupyter_runtime_dir

    manager = kernel_manager_class()(kernel_name="python3")
    assert manager.transport == "ipc"
    # The socket files go to Jupyter's runtime folder, one name per kernel, never into the
    # working folder (a killed kernel's sockets there broke copying the notebooks folder).
    assert Path(manager.ip).parent == Path(jupyter_runtime_dir())
    assert manager.ip != kernel_manager_class()(kernel_name="python3").ip


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"profile_name": "fast"}, "profile"),
        ({"profile_name": "smoke", "dataset": "kaggle"}, "dataset"),
        ({"profile_name": "smoke", "overrides": {"fractions": "0"}}, "fractions"),
        ({"profile_name": "smoke", "overrides": {"fractions": "1.5"}}, "fractions"),
        ({"profile_name": "smoke", "overrides": {"epochs": "3"}}, "no such setting"),
        ({"profile_name": "smoke", "dataset": "aptos2019", "data_dir": "/nonexistent/aptos"}, "does not exist"),
    ],
)
def test_bad_parameters_fail_before_anything_runs(tmp_path, arguments, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        reproduce(out=str(tmp_path / "run"), **arguments)
    assert not (tmp_path / "run").exists()


@pytest.mark.notebooks
def test_notebook_01_drops_an_unreadable_photograph_when_asked_and_says_so(tmp_path, write_image):
    """A zero-byte photograph with drop_unreadable: every step of notebook 01 works on the rest."""
    import papermill

    from drnb.synthetic import make_fundus_images

    root = tmp_path / "aptos"
    photographs, grades = make_fundus_images(30, size=64, seed=3)
    rows = [(f"img{i}", grade) for i, grade in enumerate(grades)]
    (root / "train_images").mkdir(parents=True)
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},{g}\n" for i, g in rows))
    for (image_id, _), photograph in zip(rows, photographs):
        write_image(root / "train_images" / f"{image_id}.png", photograph)
    (root / "train_images" / "img3.png").write_bytes(b"")
    run = tmp_path / "run"
    from drnb.runs import open_run

    open_run(run, "smoke", {"dataset": "aptos2019", "data_dir": str(root), "drop_unreadable": "true"})
    out = tmp_path / "01.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / NOTEBOOKS["data"]), str(out), parameters={"run_dir": str(run), "samples_per_grade": 1},
        kernel_name="python3", cwd=str(NOTEBOOK_DIR), progress_bar=False,
    )
    assert json.loads((run / "data" / "summary.json").read_text())["images"] == 29
    dataset = pd.read_csv(run / "data" / "dataset.csv")
    assert "img3" not in set(dataset["image_id"]) and len(dataset) == 29
    assert "img3.png" in out.read_text() and "dropping them" in out.read_text()  # said, in the notebook


def _children_running(pid: int, word: str) -> list:
    """The processes below ``pid`` whose command line holds ``word``."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if word in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


def _reproduce_process(run, runtime, *extra):
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    command = [sys.executable, "-m", "drnb", "reproduce", "--profile", "smoke", "--out", str(run), "--kernel", "python3", "--no-prediction", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.notebooks
@pytest.mark.skipif(os.name != "posix", reason="run folders are locked with fcntl, and kernels stopped by POSIX signals")
def test_a_second_reproduce_into_the_same_folder_is_refused_and_a_signal_stops_the_first_with_its_kernel(tmp_path):
    import psutil

    run, runtime = tmp_path / "run", tmp_path / "runtime"
    first = _reproduce_process(run, runtime)
    try:
        kernel = _wait_for(lambda: _children_running(first.pid, "ipykernel"), 120, "the first notebook's kernel")[0]
        assert (run / ".drnb-lock").read_text().strip() == str(first.pid)

        second = _reproduce_process(run, runtime)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err[-2000:]
        assert f"run folder {run} is in use by another drnb reproduce (process {first.pid})" in err
        assert first.poll() is None  # the holder runs on, untouched

        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert time.monotonic() - started < 30  # at once, not when the running notebook ends
        gone, alive = psutil.wait_procs([kernel], timeout=10)
        assert not alive, "the kernel outlived drnb reproduce"
        leftovers = [path.name for path in runtime.rglob("*") if path.is_file() or path.is_socket()]
        assert not [name for name in leftovers if "kernel" in name], leftovers
        assert "stopped by SIGTERM" in out + err
    finally:
        if first.poll() is None:
            first.kill()
    # A lock left by a killed process never blocks: the folder resumes.
    from drnb.runs import RunPaths, run_lock

    holder = _reproduce_process(run, runtime)
    try:
        _wait_for(lambda: (run / ".drnb-lock").read_text().strip() == str(holder.pid), 120, "the next run to take the folder")
        holder.kill()
        holder.wait(timeout=30)
        with run_lock(RunPaths(run)):
            assert (run / ".drnb-lock").read_text().strip() == str(os.getpid())
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.notebooks
@pytest.mark.slow
def test_notebook_03_alone_on_a_fresh_folder_trains_the_pretext_then_fine_tunes(tmp_path):
    """``papermill 03_finetune_fractions.ipynb out.ipynb -p fraction 0.25`` (a fraction the profile lists), as the README says."""
    import papermill

    run = tmp_path / "run"
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / NOTEBOOKS["finetune"]), str(tmp_path / "03.ipynb"),
        parameters={"run_dir": str(run), "profile_name": "smoke", "fraction": 0.25},
        kernel_name="python3", cwd=str(NOTEBOOK_DIR), progress_bar=False,
    )
    assert (run / "pretext" / "encoder.keras").exists()
    runs = [json.loads(path.read_text()) for path in sorted(run.glob("finetune/*/*/fraction_0.25/repetition_*/metrics.json"))]
    assert sorted({(m["protocol"], m["method"]) for m in runs}) == [
        ("finetune", "rotation"), ("finetune", "scratch"), ("linear", "rotation"), ("linear", "scratch")
    ]
    assert all(m["steps"] > 0 for m in runs if m["protocol"] == "finetune")
    assert all(np.isfinite(m["qw_kappa"]) for m in runs)


# --------------------------------------------------------------------------------------------
# A finished step counts only when its file loads
# --------------------------------------------------------------------------------------------


def _truncated_encoder(path: Path) -> Path:
    """A tiny Keras model saved at ``path`` and cut to half its size, as by a full disk."""
    import keras

    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_encoder_is_named_and_the_pretext_redone(tmp_path, caplog):
    """reproduce reruns notebook 02 for it, and notebook 03 trains the pretext as if it were missing."""
    import logging

    from drnb.pretext import encoder_ready, load_encoder
    from drnb.reproduce import plan
    from drnb.runs import open_run

    paths, profile = open_run(tmp_path / "run", "smoke")
    (paths.data / "summary.json").parent.mkdir(parents=True)
    (paths.data / "summary.json").write_text('{"images": 120}')
    _truncated_encoder(paths.encoder)
    data_cell, pretext_cell = plan(profile, paths)[:2]
    warnings: list[str] = []
    assert data_cell.finished(warn=warnings.append) and not warnings
    assert not pretext_cell.finished(warn=warnings.append)
    assert len(warnings) == 1 and f"encoder {paths.encoder} is damaged" in warnings[0] and "02_rotation_pretext" in warnings[0]
    with caplog.at_level(logging.WARNING, logger="drnb"):
        assert not encoder_ready(paths.encoder)
    assert str(paths.encoder) in caplog.text and "training the pretext again" in caplog.text
    with pytest.raises(ValueError, match=re.escape(f"encoder {paths.encoder} is damaged")):
        load_encoder(paths.encoder)  # what a fine-tuning run meets, instead of Keras's "File not found"
    # Notebook 03 asks missing_pretexts, which counts the damaged encoder as missing.
    from drnb.runs import missing_pretexts

    assert missing_pretexts(paths, profile) == ["rotation"]
    source = "".join(cell.source for cell in nbformat.read(NOTEBOOK_DIR / NOTEBOOKS["finetune"], as_version=4).cells)
    assert "missing = missing_pretexts(paths, profile)" in source and "listed_fraction(fraction, profile, paths)" in source


def test_a_fraction_cell_with_a_damaged_metrics_file_is_not_finished(tmp_path):
    from drnb.reproduce import plan
    from drnb.runs import open_run

    paths, profile = open_run(tmp_path / "run", "smoke")
    cell = next(cell for cell in plan(profile, paths) if cell.stage == "finetune")
    for marker in cell.done_marker:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    warnings: list[str] = []
    assert not cell.finished(warn=warnings.append)
    assert len(warnings) == len(cell.done_marker) and all("is damaged" in line for line in warnings)
    assert str(cell.done_marker[0]) in warnings[0]


@pytest.mark.notebooks
@pytest.mark.slow
def test_a_smoke_chain_with_an_archive_compares_each_pretext_with_scratch(tmp_path):
    """Both pretexts trained on the study and an archive folder, each fine-tuned against scratch."""
    from drnb.synthetic import write_synthetic_dataset

    other = write_synthetic_dataset(tmp_path / "other", n=24, size=96, seed=5)
    archive = tmp_path / "archive"
    for index, path in enumerate(sorted((other / "train_images").glob("*.png"))):
        target = archive / f"camera_{index % 2}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = tmp_path / "run"
    settings = {"methods": "rotation,contrastive,scratch", "pretext_images": str(archive), "fractions": "1.0", "protocols": "finetune"}
    report = reproduce("smoke", out=str(out), overrides=settings, kernel="python3", predict=False, log=lambda line: None)

    assert report.ok, report.failed
    for method, folder in (("rotation", "pretext"), ("contrastive", "pretext_contrastive")):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["pretext"] == method
        trained = metrics["train_images_per_source"]
        assert set(trained) == {"synthetic", "archive"} and sum(trained.values()) + metrics["heldout_images"] == 120 + 24
    results = pd.read_csv(out / "results.csv")
    assert set(zip(results["protocol"], results["method"])) == {("finetune", m) for m in ("rotation", "contrastive", "scratch")}
    study = set(pd.read_csv(out / "data" / "dataset.csv")["image_id"].astype(str))
    for path in out.glob("finetune/*/*/fraction_1/repetition_*/predictions.csv"):  # grading never sees the archive
        assert set(pd.read_csv(path)["image_id"].astype(str)) <= study
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(zip(comparison["method"], comparison["protocol"])) == {("rotation", "finetune"), ("contrastive", "finetune")}
    assert (comparison["baseline"] == "scratch").all() and np.isfinite(comparison["pooled_difference"]).all()
    pretext_notebook = (out / "notebooks" / NOTEBOOKS["pretext"]).read_text()
    assert "'archive': 24" in pretext_notebook  # notebook 02 says where its photographs came from


def test_the_plan_trains_each_pretext_its_methods_name_and_none_without_one(tmp_path):
    from drnb.reproduce import plan
    from drnb.runs import open_run

    paths, profile = open_run(tmp_path / "both", "smoke", {"methods": "rotation,contrastive,scratch"})
    pretext = next(cell for cell in plan(profile, paths) if cell.stage == "pretext")
    assert pretext.done_marker == [paths.root / "pretext" / "encoder.keras", paths.root / "pretext_contrastive" / "encoder.keras"]
    assert paths.encoders(profile.methods) == {"rotation": pretext.done_marker[0], "contrastive": pretext.done_marker[1]}
    paths, profile = open_run(tmp_path / "scratch", "smoke", {"methods": "scratch"})
    assert [cell.stage for cell in plan(profile, paths)] == ["data", "finetune", "finetune", "analysis"]

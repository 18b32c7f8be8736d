"""The unlabelled archive: folders and datasets found, preprocessed like the study, copies left out."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drnb.archive import archive_table, check_sources, folder_table, normalise_entries, parse_source, study_duplicates
from drnb.profiles import resolve_profile


def test_a_folder_is_searched_with_its_subfolders_for_photographs_only(tmp_path, write_fundus):
    write_fundus(tmp_path / "clinic_a" / "2019" / "123_left.jpg")
    write_fundus(tmp_path / "clinic_a" / "123_right.PNG")
    write_fundus(tmp_path / "clinic_b" / "scan.tif")
    (tmp_path / "clinic_b" / "notes.txt").write_text("not a photograph")
    (tmp_path / "clinic_b" / ".hidden.png").write_bytes(b"")

    table = folder_table(tmp_path, "archive")

    assert table["image_id"].tolist() == ["clinic_a/123_right.PNG", "clinic_a/2019/123_left.jpg", "clinic_b/scan.tif"]
    assert table["patient_id"].tolist()[:2] == ["123", "123"] and pd.isna(table["patient_id"].iloc[2])
    assert (table["grade"] == -1).all() and (table["source"] == "archive").all()
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in table["path"])


def test_a_folder_without_photographs_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no photograph"):
        folder_table(tmp_path / "empty", "empty")


def test_entries_name_folders_or_registered_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("photos") == parse_source(str(tmp_path / "photos"))
    assert parse_source("photos").folder == str(tmp_path / "photos") and parse_source("photos").name == "photos"
    assert parse_source("eyepacs2015").dataset == "eyepacs2015" and parse_source("eyepacs2015").folder == ""
    assert parse_source("idrid:raw/idrid").folder == str(tmp_path / "raw" / "idrid")
    with pytest.raises(ValueError, match=r"names no registered dataset 'eyepax'"):
        parse_source("eyepax:raw")
    with pytest.raises(ValueError, match=r"synthetic"):
        parse_source("synthetic")
    with pytest.raises(ValueError, match=r"empty entry"):
        parse_source(" ")
    assert normalise_entries("photos, idrid:raw/idrid") == (str(tmp_path / "photos"), f"idrid:{tmp_path / 'raw' / 'idrid'}")


def test_a_profile_stores_the_archive_absolute_and_refuses_a_bad_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = resolve_profile("smoke", {"pretext_images": "photos,more"})
    assert profile.pretext_images == (str(tmp_path / "photos"), str(tmp_path / "more"))
    assert resolve_profile("smoke", profile.to_dict() | {"pretext_images": profile.pretext_images}).pretext_images == profile.pretext_images
    with pytest.raises(ValueError, match=r"pretext_images"):
        resolve_profile("smoke", {"pretext_images": "nosuch:dir"})
    with pytest.raises(FileNotFoundError, match=r"photos is not a folder"):
        check_sources(profile.pretext_images)
    monkeypatch.setenv("DRNB_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"idrid is not a folder"):  # a dataset at its default folder
        check_sources(["idrid"])
    with pytest.raises(ValueError, match=r"no method .* trains a pretext"):
        resolve_profile("smoke", {"pretext_images": "photos", "methods": "scratch"})


def test_a_registered_dataset_in_the_archive_has_its_grades_dropped(tmp_path, write_fundus):
    (tmp_path / "train_images").mkdir()
    for name in ("a", "b"):
        write_fundus(tmp_path / "train_images" / f"{name}.png")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\na,4\nb,3\n")

    table = archive_table([f"aptos2019:{tmp_path}"])

    assert table["image_id"].tolist() == ["aptos2019/a", "aptos2019/b"]
    assert (table["grade"] == -1).all() and (table["source"] == "aptos2019").all()


def test_an_archive_copy_of_a_study_photograph_is_found():
    rng = np.random.default_rng(0)
    study = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    archive = np.concatenate([rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8), study[4:5]])
    assert study_duplicates(archive, study, 0.97).tolist() == [False, False, False, True]
    assert not study_duplicates(archive, study, 0.0).any()  # 0: nothing compared


@pytest.fixture
def study_and_archive(tmp_path, isolated_drnb_dirs):
    """A 40-photograph synthetic study and an archive folder of 12 other synthetic photographs
    in nested folders, one of them a copy of a study photograph and one unreadable."""
    import shutil

    from drnb.synthetic import write_synthetic_dataset

    other = write_synthetic_dataset(tmp_path / "other", n=12, size=96, seed=7)
    archive = tmp_path / "archive"
    for index, path in enumerate(sorted((other / "train_images").glob("*.png"))):
        target = archive / ("clinic_a" if index % 2 else "clinic_b") / f"visit_{index % 3}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    profile = resolve_profile("smoke", {"synthetic_images": "40", "image_size": "32", "pretext_images": str(archive)})
    return profile, archive


def test_the_pretext_photographs_join_the_study_and_the_archive_less_copies_and_unreadable(study_and_archive, tmp_path):
    import shutil

    from drnb.runs import load_images, load_pretext_images, load_table

    profile, archive = study_and_archive
    shutil.copy(load_table(profile)["path"].iloc[3], archive / "clinic_a" / "copy_of_study.png")
    (archive / "clinic_b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    images, table = load_images(profile, log=lambda line: None)

    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_pretext_images(profile, images, table, log=lambda line: None)

    lines = []
    joined = load_pretext_images(profile.derive(drop_unreadable=True), images, table, log=lines.append)
    assert joined.counts == {"synthetic": 40, "archive": 12}
    assert joined.left_out == {"near duplicate of a study photograph": 1, "unreadable": 1}
    assert len(joined.images) == len(joined.table) == 52
    assert joined.images.shape[1:] == (32, 32, 3) and joined.images.dtype == np.uint8
    assert np.array_equal(joined.images[:40], images)  # the study's photographs first, as they are
    assert not joined.table["image_id"].str.contains("copy_of_study").any()
    assert any("52" in line and "archive 12" in line and "1 near duplicate" in line for line in lines)
    # The study's own folder named as an archive: its 40 files are the study's, left out by path.
    study_folder = str(Path(table["path"].iloc[0]).parent)
    again = load_pretext_images(
        profile.derive(drop_unreadable=True, pretext_images=(str(archive), study_folder)), images, table, log=lambda line: None
    )
    assert again.counts == {"synthetic": 40, "archive": 12} and again.left_out["near duplicate of a study photograph"] == 41


@pytest.mark.slow
def test_a_pretext_on_the_archive_counts_its_sources(study_and_archive, tmp_path):
    import json

    from drnb.pretext import train_pretext
    from drnb.runs import load_images, load_pretext_images

    profile, _ = study_and_archive
    images, table = load_images(profile, log=lambda line: None)
    joined = load_pretext_images(profile, images, table, log=lambda line: None)
    train_pretext(joined.images, profile, tmp_path / "pretext", table=joined.table, left_out=joined.left_out, log=lambda line: None)

    metrics = json.loads((tmp_path / "pretext" / "metrics.json").read_text())
    trained, held = metrics["train_images_per_source"], metrics["heldout_images_per_source"]
    assert set(trained) == {"synthetic", "archive"}
    assert sum(trained.values()) + sum(held.values()) == 52 == metrics["train_images"] + metrics["heldout_images"]
    assert metrics["archive_left_out"] == {"near duplicate of a study photograph": 0, "unreadable": 0}

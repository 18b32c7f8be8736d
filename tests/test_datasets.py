"""Tests for drnb.datasets: every layout becomes the common table, and bad input is named.

Each test writes a tiny copy of a real layout in ``tmp_path``: a few small images and the
label file exactly as its source publishes it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drnb.datasets import (
    DATASETS,
    NPZ_SEPARATOR,
    TABLE_COLUMNS,
    download_retinamnist,
    grade_counts,
    load_dataset,
    parse_grades,
    read_image,
)

# The IDRiD part B label files as published: a trailing space in the last header, and in
# train.csv nine empty trailing columns on every line.
IDRID_TRAIN_HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"
IDRID_TEST_HEADER = "Image name,Retinopathy grade,Risk of macular edema "


# --------------------------------------------------------------------------------------------
# Layout writers
# --------------------------------------------------------------------------------------------


def write_aptos(root: Path, write_fundus, rows: list[tuple[str, str]], images=None) -> Path:
    """APTOS 2019: train.csv (id_code,diagnosis) and train_images/<id_code>.png.

    ``rows`` are (id_code, diagnosis) as text; ``images`` the ids to draw (default all).
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = ["id_code,diagnosis"] + [f"{image_id},{grade}" for image_id, grade in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for image_id in images if images is not None else [r[0] for r in rows]:
        write_fundus(root / "train_images" / f"{image_id}.png")
    return root


def write_eyepacs(root: Path, write_fundus, rows: list[tuple[str, int]]) -> Path:
    """EyePACS 2015: trainLabels.csv (image,level) and train/<image>.jpeg."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,level"] + [f"{image},{level}" for image, level in rows]
    (root / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    for image, _ in rows:
        write_fundus(root / "train" / f"{image}.jpeg")
    return root


def write_idrid(root: Path, write_fundus, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> Path:
    """IDRiD part B: labels/{train,test}.csv as published, images/{train,test}/<name>.jpg."""
    (root / "labels").mkdir(parents=True, exist_ok=True)
    train_lines = [IDRID_TRAIN_HEADER] + [f"{name},{grade},0,,,,,,,,," for name, grade in train]
    test_lines = [IDRID_TEST_HEADER] + [f"{name},{grade},1" for name, grade in test]
    (root / "labels" / "train.csv").write_text("\n".join(train_lines) + "\n")
    (root / "labels" / "test.csv").write_text("\n".join(test_lines) + "\n")
    for split, rows in (("train", train), ("test", test)):
        for name, _ in rows:
            # A wide black border beside the disc, as in IDRiD photographs.
            write_fundus(root / "images" / split / f"{name}.jpg", height=40, width=60, radius=18)
    return root


RETINAMNIST_SPLITS = {"train": [0, 1, 2, 4], "val": [3], "test": [2, 0]}


def write_retinamnist(root: Path, name: str = "retinamnist.npz", splits=RETINAMNIST_SPLITS) -> Path:
    """MedMNIST archive: {train,val,test}_images (N, 28, 28, 3) uint8, _labels (N, 1) uint8.

    Image k of a split is filled with the grey level 10 * (k + 1) + 100 * split index, so a
    test can tell which array an image came from.
    """
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, (split, labels) in enumerate(splits.items()):
        levels = [10 * (k + 1) + 60 * index for k in range(len(labels))]
        arrays[f"{split}_images"] = np.stack([np.full((28, 28, 3), level, np.uint8) for level in levels])
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    np.savez(root / name, **arrays)
    return root


def assert_common_table(table: pd.DataFrame) -> None:
    """The table every loader returns: columns, dtypes, grade range, unique ids, files present."""
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["grade"].dtype == np.int64
    assert table["grade"].between(0, 4).all()
    assert table["image_id"].is_unique
    assert list(table.index) == list(range(len(table)))
    for path in table["path"]:
        assert Path(path.split(NPZ_SEPARATOR)[0]).is_file(), path


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def test_registry_names_every_loader_kind():
    assert {"aptos2019", "eyepacs2015", "idrid", "retinamnist", "csv", "synthetic"} <= set(DATASETS)
    for name, info in DATASETS.items():
        assert info.name == name
        assert info.kind in ("csv", "idrid", "npz", "synthetic")
        assert info.layout and info.title


def test_unknown_dataset_lists_the_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'aptos'.*aptos2019"):
        load_dataset("aptos", tmp_path)


def test_aptos2019_layout(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("000c1434d8d7", "2"), ("001639a390f0", "4"), ("0024cdab0c1e", "0")])
    table = load_dataset("aptos2019", root)
    assert_common_table(table)
    assert table["image_id"].tolist() == ["000c1434d8d7", "001639a390f0", "0024cdab0c1e"]
    assert table["grade"].tolist() == [2, 4, 0]
    assert table["path"][0] == str(root.resolve() / "train_images" / "000c1434d8d7.png")
    assert table["patient_id"].isna().all()
    assert table["split"].isna().all()
    assert read_image(table["path"][1]).shape == (48, 64, 3)


def test_eyepacs2015_layout_gives_patient_ids(tmp_path, write_fundus):
    rows = [("10003_right", 0), ("10003_left", 1), ("10007_right", 3), ("99_LEFT", 4)]
    root = write_eyepacs(tmp_path / "eyepacs", write_fundus, rows)
    table = load_dataset("eyepacs2015", root)
    assert_common_table(table)
    assert table["image_id"].tolist() == [r[0] for r in rows]
    assert table["grade"].tolist() == [0, 1, 3, 4]
    assert table["patient_id"].tolist() == ["10003", "10003", "10007", "99"]
    assert table["path"][2].endswith("train/10007_right.jpeg")


def test_idrid_layout_as_published(tmp_path, write_fundus):
    root = write_idrid(
        tmp_path / "idrid", write_fundus,
        train=[("IDRiD_001", 3), ("IDRiD_002", 0), ("IDRiD_003", 2)],
        test=[("IDRiD_001", 4), ("IDRiD_002", 1)],
    )
    table = load_dataset("idrid", root)
    assert_common_table(table)
    # The splits reuse file names: the ids stay distinct, and each points into its own folder.
    assert table["image_id"].tolist() == [
        "train/IDRiD_001", "train/IDRiD_002", "train/IDRiD_003", "test/IDRiD_001", "test/IDRiD_002",
    ]
    assert table["split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert table["grade"].tolist() == [3, 0, 2, 4, 1]
    assert table["path"][0].endswith("images/train/IDRiD_001.jpg")
    assert table["path"][3].endswith("images/test/IDRiD_001.jpg")
    assert table["patient_id"].isna().all()


def test_idrid_ignores_blank_trailing_lines(tmp_path, write_fundus):
    root = write_idrid(tmp_path / "idrid", write_fundus, train=[("IDRiD_001", 3)], test=[("IDRiD_001", 4)])
    with open(root / "labels" / "train.csv", "a") as handle:
        handle.write(",,,,,,,,,,,\n,,,,,,,,,,,\n")
    table = load_dataset("idrid", root)
    assert table["image_id"].tolist() == ["train/IDRiD_001", "test/IDRiD_001"]


def test_retinamnist_npz(tmp_path):
    root = write_retinamnist(tmp_path / "retinamnist")
    table = load_dataset("retinamnist", root)
    assert_common_table(table)
    assert len(table) == 7
    assert table["split"].tolist() == ["train"] * 4 + ["val"] + ["test"] * 2
    assert table["grade"].tolist() == [0, 1, 2, 4, 3, 2, 0]
    assert table["image_id"].tolist()[:2] == ["train/0", "train/1"]
    image = read_image(table["path"][5])  # test image 0: grey level 10 + 2 * 60
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert (image == 130).all()
    assert (read_image(table["path"][4]) == 70).all()  # val image 0


def test_retinamnist_prefers_the_largest_archive(tmp_path):
    root = write_retinamnist(tmp_path / "retinamnist")
    write_retinamnist(root, name="retinamnist_128.npz", splits={"train": [1], "val": [1], "test": [1]})
    table = load_dataset("retinamnist", root)
    assert len(table) == 3
    assert table["path"][0].split(NPZ_SEPARATOR)[0].endswith("retinamnist_128.npz")


def test_csv_layout_with_overrides(tmp_path, write_fundus):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "grades.csv").write_text("file, dr_level ,camera\nleft_eye_7,1,a\nscan-2, 4 ,b\n")
    for name in ("left_eye_7", "scan-2"):
        write_fundus(root / "pictures" / f"{name}.jpg")
    table = load_dataset(
        "csv", root, label_file="grades.csv", image_dir="pictures", id_column="file",
        grade_column="dr_level", suffix=".jpg",
    )
    assert_common_table(table)
    assert table["image_id"].tolist() == ["left_eye_7", "scan-2"]
    assert table["grade"].tolist() == [1, 4]
    assert table["path"][1] == str(root.resolve() / "pictures" / "scan-2.jpg")


def test_patient_column_keeps_a_patients_eyes_together(tmp_path, write_fundus):
    from drnb.profiles import resolve_profile
    from drnb.runs import load_table
    from drnb.splits import make_repetition_split

    root = tmp_path / "mine"
    root.mkdir()
    people = ["p1", "p1", "", "p2", "p2", "p3", "p3", " p4 ", "p4", "p5"]
    rows = [f"img{i},{i % 5},{person}" for i, person in enumerate(people)]
    (root / "labels.csv").write_text("id,grade,person\n" + "\n".join(rows) + "\n")
    for i in range(len(people)):
        write_fundus(root / "images" / f"img{i}.png")
    table = load_table(resolve_profile("quick", {"dataset": "csv", "data_dir": str(root), "patient_column": "person"}))
    assert_common_table(table)
    assert table["patient_id"].fillna("-").tolist() == ["p1", "p1", "-", "p2", "p2", "p3", "p3", "p4", "p4", "p5"]
    assert load_dataset("csv", root)["patient_id"].isna().all()  # without the column, no patients
    groups = table["patient_id"].fillna(table["image_id"]).to_numpy()
    for repetition in range(5):
        test = make_repetition_split(
            table["grade"].to_numpy(), repetition, (1.0,), patient_ids=groups, seed=0, validation_fraction=0
        ).test
        for patient in ("p1", "p2", "p3", "p4"):
            in_test = np.isin(np.flatnonzero(groups == patient), test)
            assert in_test.all() or not in_test.any(), f"patient {patient} split across folds"


def test_missing_patient_column_names_file_and_column(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0"), ("b", "2")])
    with pytest.raises(ValueError, match=r"train\.csv lacks column\(s\) \['patient'\]"):
        load_dataset("aptos2019", root, patient_column="patient")


def test_patient_column_on_a_layout_without_label_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="patient_column='person'.*'retinamnist'"):
        load_dataset("retinamnist", tmp_path, patient_column="person")


def test_csv_layout_defaults_need_the_overrides(tmp_path, write_fundus):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "grades.csv").write_text("file,dr_level\na,1\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "labels.csv"))):
        load_dataset("csv", root)


def test_synthetic_dataset_is_written_and_loaded(tmp_path):
    root = tmp_path / "synthetic"
    table = load_dataset("synthetic", root, synthetic_images=6, synthetic_size=32, seed=3)
    assert_common_table(table)
    assert len(table) == 6
    assert (root / "train.csv").is_file()
    assert read_image(table["path"][0]).shape == (32, 32, 3)
    again = load_dataset("synthetic", root, synthetic_images=6, synthetic_size=32, seed=3)
    pd.testing.assert_frame_equal(table, again)


# --------------------------------------------------------------------------------------------
# Bad input: every error names the file (and row) and what was expected
# --------------------------------------------------------------------------------------------


def test_missing_data_dir_names_folder_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("aptos2019", missing)
    message = str(error.value)
    assert str(missing) in message
    assert "train.csv" in message and "train_images" in message  # the expected layout
    assert "kaggle.com" in message  # where to get it


def test_missing_label_file_is_named(tmp_path):
    (tmp_path / "eyepacs" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "eyepacs" / "trainLabels.csv"))):
        load_dataset("eyepacs2015", tmp_path / "eyepacs")


def test_missing_idrid_test_labels_are_named(tmp_path, write_fundus):
    root = write_idrid(tmp_path / "idrid", write_fundus, train=[("IDRiD_001", 3)], test=[("IDRiD_001", 4)])
    (root / "labels" / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "labels" / "test.csv"))):
        load_dataset("idrid", root)


def test_misnamed_column_names_file_expected_and_found(tmp_path, write_fundus):
    root = tmp_path / "aptos"
    root.mkdir()
    (root / "train.csv").write_text("id,diagnosis\na,1\n")
    with pytest.raises(ValueError) as error:
        load_dataset("aptos2019", root)
    message = str(error.value)
    assert str(root / "train.csv") in message
    assert "'id_code'" in message  # what is missing
    assert "'id'" in message  # what the file has


def test_idrid_misnamed_grade_column(tmp_path, write_fundus):
    root = write_idrid(tmp_path / "idrid", write_fundus, train=[("IDRiD_001", 3)], test=[("IDRiD_001", 4)])
    path = root / "labels" / "test.csv"
    path.write_text(path.read_text().replace("Retinopathy grade", "DR grade"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*'Retinopathy grade'"):
        load_dataset("idrid", root)


@pytest.mark.parametrize("bad", ["5", "x", "2.5", "", "-1"])
def test_bad_grade_names_file_row_and_value(tmp_path, write_fundus, bad):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0"), ("b", bad), ("c", "9")])
    with pytest.raises(ValueError) as error:
        load_dataset("aptos2019", root)
    message = str(error.value)
    assert str(root / "train.csv") in message
    assert "'diagnosis'" in message
    assert "row 3" in message  # line 3 of the file: header, a, b
    assert repr(bad) in message
    assert "0-4" in message
    assert "2 bad row(s)" in message  # "9" in row 4 is counted too


def test_idrid_bad_grade_names_the_split_file_and_row(tmp_path, write_fundus):
    root = write_idrid(
        tmp_path / "idrid", write_fundus, train=[("IDRiD_001", 3), ("IDRiD_002", 7)], test=[("IDRiD_001", 4)]
    )
    with pytest.raises(ValueError, match=re.escape(str(root / "labels" / "train.csv")) + r".*row 3 holds '7'"):
        load_dataset("idrid", root)


def test_parse_grades_accepts_integer_text_and_floats_with_zero_fraction():
    grades = parse_grades(pd.Series(["0", " 4 ", "2.0", "3"]), Path("labels.csv"), "grade")
    assert grades.dtype == np.int64
    assert grades.tolist() == [0, 4, 2, 3]


def test_duplicate_ids_are_named(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0"), ("b", "1"), ("a ", "2")], images=["a", "b"])
    with pytest.raises(ValueError) as error:
        load_dataset("aptos2019", root)
    message = str(error.value)
    assert str(root / "train.csv") in message and "'id_code'" in message
    assert "['a']" in message
    assert "expected each image once" in message


def test_header_only_label_file(tmp_path):
    root = tmp_path / "aptos"
    (root / "train_images").mkdir(parents=True)
    (root / "train.csv").write_text("id_code,diagnosis\n")
    with pytest.raises(ValueError, match=re.escape(str(root / "train.csv")) + ".*no rows"):
        load_dataset("aptos2019", root)


def test_empty_label_file(tmp_path):
    root = tmp_path / "aptos"
    root.mkdir()
    (root / "train.csv").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(root / "train.csv")) + ".*not a readable CSV"):
        load_dataset("aptos2019", root)


def test_missing_images_are_counted_and_the_first_named(tmp_path, write_fundus):
    rows = [(f"img{i}", str(i % 5)) for i in range(8)]
    root = write_aptos(tmp_path / "aptos", write_fundus, rows, images=["img3"])
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("aptos2019", root)
    message = str(error.value)
    assert "7 of 8 image(s)" in message
    assert "img0.png" in message and "img5.png" in message  # the first five missing are named
    assert "img7.png" not in message  # the rest are only counted
    assert "img3.png" not in message  # present
    assert "drop_missing=True (--set drop_missing=true)" in message  # what the command line accepts
    assert "--drop-missing" not in message


@pytest.mark.parametrize("image_id", ["../../outside/secret", "sub/../../secret", "/etc/passwd", "..\\secret", "C:\\x"])
def test_an_id_that_leaves_the_image_folder_is_refused_with_its_row(tmp_path, write_fundus, image_id):
    outside = tmp_path / "outside"
    write_fundus(outside / "secret.png")
    rows = [("a", "0"), (image_id, "1")]
    root = write_aptos(tmp_path / "data" / "aptos", write_fundus, rows, images=["a"])
    with pytest.raises(ValueError, match=f"column 'id_code' row 3 holds {re.escape(repr(image_id))}, which leaves the image folder"):
        load_dataset("aptos2019", root, drop_missing=True)


def test_an_id_in_a_subfolder_of_the_image_folder_is_read(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0")])
    write_fundus(root / "train_images" / "clinic1" / "b.png")
    (root / "train.csv").write_text("id_code,diagnosis\na,0\nclinic1/b,2\n")
    assert load_dataset("aptos2019", root)["image_id"].tolist() == ["a", "clinic1/b"]


def test_drop_missing_drops_with_a_warning(tmp_path, write_fundus, caplog):
    rows = [("a", "0"), ("b", "1"), ("c", "2"), ("d", "3")]
    root = write_aptos(tmp_path / "aptos", write_fundus, rows, images=["b", "d"])
    with caplog.at_level(logging.WARNING, logger="drnb.datasets"):
        table = load_dataset("aptos2019", root, drop_missing=True)
    assert table["image_id"].tolist() == ["b", "d"]
    assert table["grade"].tolist() == [1, 3]
    assert list(table.index) == [0, 1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 4" in warnings[0].getMessage() and "a.png" in warnings[0].getMessage()


def test_drop_missing_with_nothing_left_is_an_error(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0")], images=[])
    with pytest.raises(ValueError, match="no images left"):
        load_dataset("aptos2019", root, drop_missing=True)


def test_unreadable_image_is_found_and_named(tmp_path, write_fundus):
    root = write_aptos(tmp_path / "aptos", write_fundus, [("a", "0"), ("b", "1")])
    bad = root / "train_images" / "b.png"
    bad.write_bytes(b"\x89PNG not really an image" * 4)
    load_dataset("aptos2019", root)  # listed files exist: loading does not decode
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*cannot be decoded"):
        read_image(str(bad))


def test_a_truncated_jpeg_is_named_when_read(tmp_path, write_fundus):
    root = write_eyepacs(tmp_path / "eyepacs", write_fundus, [("1_left", 0), ("1_right", 2)])
    bad = root / "train" / "1_right.jpeg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    load_dataset("eyepacs2015", root)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        read_image(str(bad))


@pytest.mark.parametrize("cut", [False, True], ids=["garbage", "truncated"])
def test_corrupt_retinamnist_archive_is_named(tmp_path, cut):
    root = tmp_path / "retinamnist"
    if cut:
        write_retinamnist(root)
        data = (root / "retinamnist.npz").read_bytes()
        (root / "retinamnist.npz").write_bytes(data[:-200])
    else:
        root.mkdir()
        (root / "retinamnist.npz").write_bytes(b"not an archive " * 20)
    with pytest.raises(ValueError, match=re.escape(str(root / "retinamnist.npz"))):
        load_dataset("retinamnist", root)


def test_retinamnist_archive_without_the_expected_arrays(tmp_path):
    root = tmp_path / "retinamnist"
    root.mkdir()
    np.savez(root / "retinamnist.npz", images=np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(root / "retinamnist.npz")) + ".*train/val/test"):
        load_dataset("retinamnist", root)


def test_retinamnist_bad_label_names_the_array(tmp_path):
    root = write_retinamnist(tmp_path / "retinamnist", splits={"train": [0, 1], "val": [6], "test": [2]})
    with pytest.raises(ValueError, match=r"retinamnist\.npz: column 'val_labels' row \d+ holds .*\b6\b.*0-4"):
        load_dataset("retinamnist", root)


def test_retinamnist_archive_replaced_in_place_is_reread(tmp_path):
    root = write_retinamnist(tmp_path / "retinamnist", splits={"train": [1], "val": [1], "test": [1]})
    assert load_dataset("retinamnist", root)["grade"].tolist() == [1, 1, 1]
    write_retinamnist(root, splits={"train": [3, 3], "val": [3], "test": [3]})
    assert load_dataset("retinamnist", root)["grade"].tolist() == [3, 3, 3, 3]


def test_retinamnist_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    root = tmp_path / "retinamnist"
    root.mkdir()
    with pytest.raises(RuntimeError) as error:
        load_dataset("retinamnist", root)
    message = str(error.value)
    assert "https://zenodo.org/records/10519652/files/retinamnist.npz" in message
    assert str(root / "retinamnist.npz") in message
    assert "bd4c0672f1bba3e3a89f0e4e876791e4" in message
    assert "network is unreachable" in message
    with pytest.raises(RuntimeError, match=re.escape(str(root / "retinamnist_224.npz"))):
        download_retinamnist(root, size=224)
    with pytest.raises(ValueError, match="size=64"):
        download_retinamnist(root, size=64)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def test_grade_counts_include_empty_grades():
    counts = grade_counts(pd.DataFrame({"grade": np.array([0, 0, 3, 0], dtype=np.int64)}))
    assert counts.index.tolist() == [0, 1, 2, 3, 4]
    assert counts.tolist() == [3, 0, 0, 1, 0]




# --------------------------------------------------------------------------------------------
# read_image: every depth and mode Pillow opens becomes 8-bit RGB
# --------------------------------------------------------------------------------------------


def _png16(path: Path, values: np.ndarray) -> Path:
    """Write uint16 (H, W, 3) as a 16-bit RGB PNG by hand (Pillow writes 16-bit greyscale only)."""
    import struct
    import zlib

    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _save_in_mode(path: Path, rgb: np.ndarray, mode: str) -> np.ndarray:
    """Save ``rgb`` (uint8 (H, W, 3)) as ``mode``; return the RGB that reading it should give."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if mode in ("grey16_png", "grey16_tiff"):
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 16-bit: 255 * 257 = 65535 is white
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "float_tiff":
        Image.fromarray(grey.astype(np.float32) / 255).save(path)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "rgb16_png":
        _png16(path, rgb.astype(np.uint16) * 257)
        return rgb
    if mode == "rgba_transparent_background":
        alpha = np.where(rgb.max(axis=2) > 0, 255, 0).astype(np.uint8)
        background = np.full_like(rgb, 255)  # white where transparent: must read as black
        Image.fromarray(np.dstack([np.where(alpha[..., None] > 0, rgb, background), alpha])).save(path)
        return rgb
    image = Image.fromarray(rgb).convert(mode)
    image.save(path)
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize(
    "mode, suffix",
    [("L", ".png"), ("grey16_png", ".png"), ("grey16_tiff", ".tif"), ("float_tiff", ".tif"), ("rgb16_png", ".png"),
     ("P", ".png"), ("RGBA", ".png"), ("rgba_transparent_background", ".png"), ("CMYK", ".tif"), ("LA", ".png")],
)
def test_read_image_scales_every_depth_and_mode_to_8_bit_rgb(tmp_path, draw_fundus, mode, suffix):
    rgb = draw_fundus(40, 48)
    expected = _save_in_mode(tmp_path / f"photo{suffix}", rgb, mode)
    read = read_image(str(tmp_path / f"photo{suffix}"))
    assert read.dtype == np.uint8 and read.shape == (40, 48, 3)
    assert np.abs(read.astype(int) - expected.astype(int)).max() <= 1


def test_read_image_refuses_float_pixels_without_a_range(tmp_path):
    from PIL import Image

    path = tmp_path / "odd.tif"
    Image.fromarray(np.full((8, 8), -3.0, np.float32)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*float pixels"):
        read_image(str(path))

"""Dataset registry and loaders: every source becomes the same table.

Loading any registered dataset gives a :class:`pandas.DataFrame` with one row per
image and the columns

``image_id`` (str)
    unique within the dataset (IDRiD's train and test share file names, so its ids are
    prefixed with the split).
``path`` (str)
    absolute path of the image file, or ``<file.npz>::<array>::<index>`` for images
    stored inside a NumPy archive (RetinaMNIST); :func:`read_image` reads both.
``grade`` (int64, 0-4)
    0 no DR, 1 mild, 2 moderate, 3 severe, 4 proliferative.
``patient_id`` (str or missing)
    where the layout gives one (EyePACS ``10003_right`` is patient ``10003``), so that
    splits can keep both eyes of a patient on one side.
``split`` (str or missing)
    the split the source publishes (IDRiD ``train``/``test``; RetinaMNIST
    ``train``/``val``/``test``), kept for reference: drnb's cross-validation uses every
    labelled image.

The facts about each dataset live in one place, :data:`DATASETS`.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("image_id", "path", "grade", "patient_id", "split")
# Loader kinds read by _load_csv_layout: one label file, one image folder (synthetic is written as one).
LABEL_FILE_KINDS = ("csv", "synthetic")
GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")
NPZ_SEPARATOR = "::"
_SHOWN = 5  # how many offending files or rows an error message names


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about one dataset: where it comes from and how it is laid out on disk."""

    name: str
    title: str
    layout: str  # human-readable expected layout, shown by ``drnb datasets``
    source: str
    licence: str
    citation: str
    kind: str  # which loader reads it: "csv", "idrid", "npz" or "synthetic"
    label_file: str = ""
    image_dir: str = ""
    id_column: str = ""
    grade_column: str = ""
    patient_column: str = ""  # csv layout: column of patient ids; "" = from ids named <patient>_<left|right>
    suffix: str = ""


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="aptos2019",
            title="APTOS 2019 Blindness Detection (Kaggle), 3,662 graded photographs",
            layout="train.csv (id_code,diagnosis) and train_images/<id_code>.png",
            source="https://www.kaggle.com/competitions/aptos2019-blindness-detection/data",
            licence="Kaggle competition rules: research use, no redistribution",
            citation="Asia Pacific Tele-Ophthalmology Society, APTOS 2019 Blindness Detection, Kaggle 2019",
            kind="csv",
            label_file="train.csv",
            image_dir="train_images",
            id_column="id_code",
            grade_column="diagnosis",
            suffix=".png",
        ),
        DatasetInfo(
            name="eyepacs2015",
            title="EyePACS, Kaggle Diabetic Retinopathy Detection 2015",
            layout="trainLabels.csv (image,level) and train/<image>.jpeg; 10003_right = patient 10003",
            source="https://www.kaggle.com/competitions/diabetic-retinopathy-detection/data",
            licence="Kaggle competition rules: research use, no redistribution",
            citation="Cuadros & Bresnick, EyePACS, J Diabetes Sci Technol 2009; Kaggle 2015",
            kind="csv",
            label_file="trainLabels.csv",
            image_dir="train",
            id_column="image",
            grade_column="level",
            suffix=".jpeg",
        ),
        DatasetInfo(
            name="idrid",
            title="IDRiD part B, disease grading (413 train + 103 test)",
            layout=(
                "labels/train.csv and labels/test.csv ('Image name','Retinopathy grade', ...) "
                "and images/train/<name>.jpg, images/test/<name>.jpg"
            ),
            source="https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid",
            licence="CC BY 4.0",
            citation="Porwal et al., Indian Diabetic Retinopathy Image Dataset (IDRiD), Data 2018",
            kind="idrid",
            label_file="labels",
            image_dir="images",
            id_column="Image name",
            grade_column="Retinopathy grade",
            suffix=".jpg",
        ),
        DatasetInfo(
            name="retinamnist",
            title="MedMNIST v2 RetinaMNIST (1,600 images from DeepDRiD)",
            layout="retinamnist.npz (or retinamnist_64/_128/_224.npz) with {train,val,test}_{images,labels}",
            source="https://zenodo.org/records/10519652",
            licence="CC BY 4.0",
            citation="Yang et al., MedMNIST v2, Scientific Data 2023",
            kind="npz",
            label_file="retinamnist.npz",
        ),
        DatasetInfo(
            name="csv",
            title="any CSV of labels plus a folder of images",
            layout="<label file> with an id and a grade column, and <image dir>/<id><suffix>",
            source="your own",
            licence="yours",
            citation="",
            kind="csv",
            label_file="labels.csv",
            image_dir="images",
            id_column="id",
            grade_column="grade",
            suffix=".png",
        ),
        DatasetInfo(
            name="synthetic",
            title="synthetic fundus images made by drnb (demos and tests only, not real eyes)",
            layout="written on first use in the APTOS 2019 layout (train.csv, train_images/)",
            source="drnb.synthetic",
            licence="MIT, as drnb",
            citation="",
            kind="synthetic",
            label_file="train.csv",
            image_dir="train_images",
            id_column="id_code",
            grade_column="diagnosis",
            suffix=".png",
        ),
    )
}

# MedMNIST publishes the dataset at 28, 64, 128 and 224 px, each file with its own md5 (see
# MedMNIST's info.py). drnb downloads the two whose checksums it records; the 64 and 128 px
# files load when placed in the data folder by hand.
RETINAMNIST_MD5 = {
    28: "bd4c0672f1bba3e3a89f0e4e876791e4",
    224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the registry entry for ``name``, or raise a ValueError listing the known names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def default_data_root() -> Path:
    """Folder that holds downloaded datasets: ``$DRNB_DATA``, else the checkout's ``data/``.

    Outside a checkout (drnb installed from a wheel) it is ``~/drnb-data``.
    """
    if os.environ.get("DRNB_DATA"):
        return Path(os.environ["DRNB_DATA"]).expanduser()
    checkout_data = Path(__file__).resolve().parents[1] / "data"
    if (checkout_data / "README.md").exists():
        return checkout_data
    return Path.home() / "drnb-data"


def default_data_dir(name: str) -> Path:
    """Where dataset ``name`` is looked for when no ``data_dir`` is given."""
    return default_data_root() / dataset_info(name).name


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    drop_missing: bool = False,
    label_file: str | None = None,
    image_dir: str | None = None,
    id_column: str | None = None,
    grade_column: str | None = None,
    patient_column: str | None = None,
    suffix: str | None = None,
    synthetic_images: int = 600,
    synthetic_size: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Load a registered dataset as drnb's common table (see the module docstring).

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    data_dir : path, optional
        The dataset's folder as it comes from its source; default :func:`default_data_dir`.
    drop_missing : bool
        Images listed in the labels but absent on disk raise a ``FileNotFoundError``
        (all counted, the first few named); with ``drop_missing`` they are dropped with a
        warning instead.
    label_file, image_dir, id_column, grade_column, suffix : str, optional
        Override the registry's layout; needed for ``csv`` when your files differ from
        ``labels.csv`` / ``images/`` / ``id`` / ``grade`` / ``.png``.
    patient_column : str, optional
        For the label-file layouts (``csv``, ``aptos2019``, ``eyepacs2015``): the column
        naming each image's patient, so that both eyes of a patient stay on one side of every
        split. Empty cells mean "no patient known" (the image is its own group). Without it,
        ids named ``<patient>_<left|right>`` (EyePACS) give the patient.
    synthetic_images, synthetic_size, seed : int
        For ``synthetic`` only: how many images, their size in pixels, and the seed.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`, one row per image, ``grade`` int64 in 0-4.
    """
    info = dataset_info(name)
    overrides = {
        "label_file": label_file,
        "image_dir": image_dir,
        "id_column": id_column,
        "grade_column": grade_column,
        "patient_column": patient_column,
        "suffix": suffix,
    }
    info = DatasetInfo(**{**info.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if info.patient_column and info.kind not in LABEL_FILE_KINDS:
        with_label_file = [other.name for other in DATASETS.values() if other.kind == "csv"]
        raise ValueError(
            f"patient_column={info.patient_column!r}: dataset {name!r} has no label file to read patients from; "
            f"patient_column applies to the label-file layouts ({', '.join(with_label_file)})"
        )
    if data_dir is None:
        data_dir = default_data_dir(name)
        if info.kind == "synthetic":
            data_dir = data_dir / f"n{synthetic_images}_px{synthetic_size}_seed{seed}"
    if not str(data_dir).strip():
        raise ValueError(f"data_dir {str(data_dir)!r} for dataset {name!r}: expected a folder; leave it out for the default")
    data_dir = Path(data_dir).expanduser().resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} for dataset {name!r} is a file; expected a folder: {info.layout}")

    if info.kind == "synthetic":
        from drnb.synthetic import write_synthetic_dataset

        write_synthetic_dataset(data_dir, n=synthetic_images, size=synthetic_size, seed=seed)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data directory {data_dir} for dataset {name!r} does not exist; expected {info.layout}"
            + (f" (download from {info.source})" if info.source.startswith("http") else "")
        )

    if info.kind in LABEL_FILE_KINDS:
        table = _load_csv_layout(info, data_dir)
    elif info.kind == "idrid":
        table = pd.concat(
            [_load_idrid_split(info, data_dir, split) for split in ("train", "test")], ignore_index=True
        )
    elif info.kind == "npz":
        table = _load_npz(info, data_dir)
    else:  # a registry entry with a kind no loader reads is a bug in drnb, not user input
        raise RuntimeError(f"no loader for dataset kind {info.kind!r}")

    table = _drop_or_raise_missing(table, name, drop_missing)
    if table.empty:
        raise ValueError(f"dataset {name!r} in {data_dir} has no images left to use")
    return table.reset_index(drop=True)


def _read_label_csv(label_path: Path, required: list[str]) -> pd.DataFrame:
    if not label_path.is_file():
        raise FileNotFoundError(f"label file {label_path} not found")
    try:
        labels = pd.read_csv(label_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"label file {label_path} is not a readable CSV: {error}") from None
    # Published label files carry stray whitespace in headers (IDRiD's "Risk of macular edema ")
    # and empty trailing columns; match columns by their stripped names.
    labels.columns = [str(column).strip() for column in labels.columns]
    labels = labels.loc[:, [c for c in labels.columns if c and not c.startswith("Unnamed:")]]
    missing = [column for column in required if column not in labels.columns]
    if missing:
        raise ValueError(
            f"label file {label_path} lacks column(s) {missing}; it has {list(labels.columns)}, "
            f"expected {required}"
        )
    if labels.empty:
        raise ValueError(f"label file {label_path} has a header but no rows")
    return labels


def parse_grades(values: pd.Series, source: Path, column: str, row_offset: int = 2) -> np.ndarray:
    """Parse a column of grades as int64 0-4, naming the first bad row.

    ``row_offset`` turns a 0-based position into the row number shown: 2 for a CSV file
    (1-based, after the header line), 0 for an index into an array.
    """
    text = values.astype(str).str.strip()
    valid = text.str.fullmatch(r"[0-4](\.0*)?")
    if not valid.all():
        bad = np.flatnonzero(~valid.to_numpy())
        row = int(bad[0])
        raise ValueError(
            f"{source}: column {column!r} row {row + row_offset} holds {str(values.iloc[row])!r}; expected an integer "
            f"grade 0-4 ({len(bad)} bad row(s) in all)"
        )
    return text.str.split(".").str[0].astype(np.int64).to_numpy()


def _check_unique(ids: pd.Series, source: Path, column: str) -> None:
    duplicated = ids[ids.duplicated(keep=False)]
    if not duplicated.empty:
        names = list(dict.fromkeys(duplicated))[:_SHOWN]
        raise ValueError(
            f"{source}: column {column!r} repeats {duplicated.nunique()} id(s), e.g. {names}; "
            "expected each image once"
        )


def _check_ids_stay_inside(ids: pd.Series, source: Path, column: str, image_root: Path) -> None:
    """An id names a file inside the image folder: refuse an absolute path or a ``..`` part,
    naming the first such row (``ids`` in file order, the header being row 1)."""
    for position, image_id in enumerate(ids):
        parts = PurePosixPath(image_id.replace("\\", "/")).parts
        if image_id.startswith(("/", "\\")) or PureWindowsPath(image_id).drive or ".." in parts:
            raise ValueError(
                f"{source}: column {column!r} row {position + 2} holds {image_id!r}, which leaves the image folder "
                f"{image_root}; expected the name of a file inside it (no absolute path, no '..')"
            )


def patient_ids_from_names(image_ids: pd.Series) -> pd.Series:
    """The patient of each image named EyePACS-style, ``<patient>_<left|right>``; None elsewhere."""
    match = image_ids.str.extract(r"^(.+)_(?:left|right)$", flags=re.IGNORECASE)[0]
    return match.where(match.notna(), None)


def _load_csv_layout(info: DatasetInfo, data_dir: Path) -> pd.DataFrame:
    label_path = data_dir / info.label_file
    columns = [info.id_column, info.grade_column] + ([info.patient_column] if info.patient_column else [])
    labels = _read_label_csv(label_path, columns)
    ids = labels[info.id_column].str.strip()
    _check_unique(ids, label_path, info.id_column)
    image_root = data_dir / info.image_dir
    _check_ids_stay_inside(ids, label_path, info.id_column, image_root)
    if info.patient_column:
        patients = labels[info.patient_column].str.strip()
        patients = patients.where(patients != "", None)
    else:
        patients = patient_ids_from_names(ids)
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [str(image_root / f"{image_id}{info.suffix}") for image_id in ids],
            "grade": parse_grades(labels[info.grade_column], label_path, info.grade_column),
            "patient_id": patients,
            "split": None,
        }
    )


def _load_idrid_split(info: DatasetInfo, data_dir: Path, split: str) -> pd.DataFrame:
    label_path = data_dir / info.label_file / f"{split}.csv"
    labels = _read_label_csv(label_path, [info.id_column, info.grade_column])
    labels = labels[labels[info.id_column].str.strip() != ""]  # trailing blank lines
    ids = labels[info.id_column].str.strip()
    _check_unique(ids, label_path, info.id_column)
    _check_ids_stay_inside(ids, label_path, info.id_column, data_dir / info.image_dir / split)
    return pd.DataFrame(
        {
            "image_id": [f"{split}/{image_id}" for image_id in ids],
            "path": [str(data_dir / info.image_dir / split / f"{i}{info.suffix}") for i in ids],
            "grade": parse_grades(labels[info.grade_column], label_path, info.grade_column),
            "patient_id": None,
            "split": split,
        }
    )


def find_retinamnist_file(data_dir: Path) -> Path:
    """Return the RetinaMNIST archive in ``data_dir``, preferring the largest image size."""
    for size in (224, 128, 64):
        candidate = data_dir / f"retinamnist_{size}.npz"
        if candidate.is_file():
            return candidate
    return data_dir / "retinamnist.npz"


def download_retinamnist(data_dir: str | os.PathLike, size: int = 28) -> Path:
    """Download MedMNIST's RetinaMNIST archive into ``data_dir`` with pooch, checking its md5.

    Offline, raises a ``RuntimeError`` that says what to download and where to put it.
    """
    if size not in RETINAMNIST_MD5:
        raise ValueError(f"size={size} is not published; expected one of {sorted(RETINAMNIST_MD5)}")
    import pooch

    file_name = "retinamnist.npz" if size == 28 else f"retinamnist_{size}.npz"
    url = f"https://zenodo.org/records/10519652/files/{file_name}?download=1"
    try:
        return Path(
            pooch.retrieve(url, known_hash=f"md5:{RETINAMNIST_MD5[size]}", fname=file_name, path=data_dir)
        )
    except Exception as error:  # pooch raises requests/OS errors of many kinds when offline
        raise RuntimeError(
            f"could not download {url} ({type(error).__name__}: {error}). Download it by hand and "
            f"save it as {Path(data_dir) / file_name} (md5 {RETINAMNIST_MD5[size]})."
        ) from error


def _open_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read once per version of the file (keyed by size and mtime)."""
    stat = os.stat(path)
    return _read_npz(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_npz(path: str, size: int, mtime_ns: int) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _load_npz(info: DatasetInfo, data_dir: Path) -> pd.DataFrame:
    npz_path = find_retinamnist_file(data_dir)
    if not npz_path.is_file():
        npz_path = download_retinamnist(data_dir)
    try:
        archive = _open_npz(str(npz_path))
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{npz_path} is not a readable .npz archive ({type(error).__name__}: {error})") from None
    try:
        rows = []
        for split in ("train", "val", "test"):
            labels = archive[f"{split}_labels"].reshape(-1)
            images = archive[f"{split}_images"]
            if len(images) != len(labels):
                raise ValueError(f"{npz_path}: {split}_images and {split}_labels differ in length")
            grades = parse_grades(pd.Series(labels), npz_path, f"{split}_labels", row_offset=0)
            rows.append(
                pd.DataFrame(
                    {
                        "image_id": [f"{split}/{i}" for i in range(len(labels))],
                        "path": [f"{npz_path}{NPZ_SEPARATOR}{split}_images{NPZ_SEPARATOR}{i}" for i in range(len(labels))],
                        "grade": grades,
                        "patient_id": None,
                        "split": split,
                    }
                )
            )
    except KeyError as error:
        raise ValueError(
            f"{npz_path} is not a MedMNIST archive with train/val/test images and labels: {error}"
        ) from None
    return pd.concat(rows, ignore_index=True)


def _drop_or_raise_missing(table: pd.DataFrame, name: str, drop_missing: bool) -> pd.DataFrame:
    file_paths = table["path"].str.split(NPZ_SEPARATOR).str[0]
    exists = np.array([os.path.isfile(p) for p in file_paths])
    if exists.all():
        return table
    missing = table.loc[~exists, "path"].tolist()
    message = (
        f"{len(missing)} of {len(table)} image(s) listed for dataset {name!r} are missing, "
        f"e.g. {missing[:_SHOWN]}"
    )
    if not drop_missing:
        raise FileNotFoundError(message + "; drop_missing=True (--set drop_missing=true) skips them")
    logger.warning("%s; dropping them", message)
    return table.loc[exists]


def read_image(path: str) -> np.ndarray:
    """Read one image reference from the table as 8-bit RGB, whatever its depth and mode.

    16-bit and 32-bit greyscale (PNG, TIFF) and float images are scaled from their own
    range to [0, 255] (:func:`scale_to_uint8`): Pillow's ``convert("RGB")`` clips them
    instead, so a 16-bit photograph would read as a white square. Transparent pixels (RGBA,
    LA, a palette with transparency) become black, the background of a fundus photograph.
    Palette, CMYK, 1-bit and 16-bit RGB images go through Pillow's own conversion.

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3) in [0, 255].

    Raises
    ------
    ValueError
        naming the file when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if NPZ_SEPARATOR in path:
        npz_path, key, index = path.split(NPZ_SEPARATOR)
        image = _open_npz(npz_path)[key][int(index)]
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    try:
        with Image.open(path) as image:
            return _as_rgb8(image, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image file {path} cannot be decoded: {error}") from None


# Pillow's modes for one channel wider than 8 bits (16-bit greyscale PNG and TIFF, 32-bit
# integer and float TIFF); convert("RGB") clips these at 255 instead of scaling them.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _as_rgb8(image, path: str) -> np.ndarray:
    """A decoded Pillow image as uint8 (H, W, 3): wide greyscale scaled, transparency on black."""
    if image.mode in WIDE_GREY_MODES or image.mode == "F":
        grey = scale_to_uint8(np.asarray(image), path)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        return np.rint(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def scale_to_uint8(values: np.ndarray, path: str = "") -> np.ndarray:
    """One channel of any depth as uint8 in [0, 255], scaled from the range its depth holds.

    Parameters
    ----------
    values : numpy.ndarray
        (H, W): uint8 (kept), uint16 or integers in 0..65535 (16-bit: 65535 is white),
        wider integers (32-bit: 2**31 - 1 is white, below 0 black), or floats in [0, 1]
        (1 is white) or in [0, 65535] (16-bit values stored as floats).
    path : str
        The file, named in the error.

    Raises
    ------
    ValueError
        For float values outside [0, 65535] (or not finite): no depth says what is white.
    """
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 65535:
            raise ValueError(
                f"image file {path} holds float pixels from {np.nanmin(values):g} to {np.nanmax(values):g}: "
                "expected values in [0, 1] or 16-bit values in [0, 65535]"
            )
        white = 1.0 if values.max() <= 1.0 else 65535.0
    else:
        white = 65535.0 if values.max() <= 65535 else float(2**31 - 1)
    scaled = np.clip(values.astype(np.float64), 0, white) * (255.0 / white)
    return np.rint(scaled).astype(np.uint8)


def grade_counts(table: pd.DataFrame) -> pd.Series:
    """Images per grade 0-4 (zeros included), as an int64 Series indexed by grade."""
    return table["grade"].value_counts().reindex(range(5), fill_value=0).rename("images")

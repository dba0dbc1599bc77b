"""MedMNIST 28x28 (BreastMNIST, PneumoniaMNIST, RetinaMNIST) from the shipped official .npz files.

The natural federation is one site, "all", with the official train, val (our validation) and
test splits. Images
become float32 in [0, 1], NCHW. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from common.data.schema import DataError
from common.data.splits import DataSpec, SiteSplit
from common.datasets import dataset_dir

DATA_DIR = dataset_dir("medmnist", "breastmnist.npz")
SPLITS = ("train", "val", "test")
# name: (file, class names by medfed's class index, channels); label meanings from
# common/datasets/medmnist/README.md. A binary task's class 1 is the finding a diagnosis looks
# for (sensitivity, thresholds such as `sensitivity>=0.9` and p(positive) are about it).
DATASETS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "breast": ("breastmnist.npz", ("normal/benign", "malignant"), 1),
    "pneumonia": ("pneumoniamnist.npz", ("normal", "pneumonia"), 1),
    "retina": ("retinamnist.npz", ("grade-0", "grade-1", "grade-2", "grade-3", "grade-4"), 3),
}
# medfed's class of each label in a file, where the file numbers them otherwise: BreastMNIST
# labels malignant 0 and normal/benign 1
CLASS_OF_FILE_LABEL: dict[str, tuple[int, ...]] = {"breast": (1, 0)}
SITE = "all"


def _entry(name: str) -> tuple[str, tuple[str, ...], int]:
    if name not in DATASETS:
        raise DataError(
            f"config key 'data.medmnist' must be one of {', '.join(DATASETS)}, got {name!r}"
        )
    return DATASETS[name]


# what np.load and reading an archive member raise for a bad file (BadZipFile: truncated or
# a CRC mismatch; ValueError: not an array file, or object arrays that would need pickle)
NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


MAX_ARRAY_BYTES = 2 << 30  # an image array medfed will decompress: 2 GiB
MAX_PIXELS = 4096 * 4096  # a PNG larger than this is refused before it is decoded


def check_npz_sizes(path: Path, limit: int = MAX_ARRAY_BYTES) -> None:
    """Read each member's .npy header (not its data) and refuse arrays above `limit` bytes.

    A few compressed KB can expand to GBs: the shape is known from the header alone.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                size = int(np.prod(shape, dtype=np.float64)) * max(dtype.itemsize, 1)
                if size > limit:
                    raise DataError(
                        f"{path}: array '{info.filename[:-4]}' of shape {shape} would take "
                        f"{size / 2**30:.1f} GiB once decompressed (limit {limit / 2**30:g} "
                        "GiB); refused")
    except zipfile.BadZipFile:
        return  # not an archive (a plain .npy), or corrupt: np.load reports it
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file: {npz_problem(err)}") from err


def npz_problem(err: BaseException) -> str:
    """A few words on why an .npz/.npy file could not be read (no file contents)."""
    if isinstance(err, ValueError):
        return "not an array file, or it holds pickled objects (never loaded)"
    return f"the file is corrupt or truncated ({type(err).__name__})"


def to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 0-255 or float 0-1 images (N,H,W), (N,H,W,C) or (N,C,H,W) -> float32 NCHW [0,1].

    A 4-d array is channels-last when its last axis has 1 or 3 entries, otherwise
    channels-first when its second axis has 1 or 3.
    """
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[:, None, :, :]
    elif a.ndim == 4 and a.shape[-1] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    elif not (a.ndim == 4 and a.shape[1] in (1, 3)):
        raise DataError(
            f"{where}: images must have shape (N,H,W), (N,H,W,C) or (N,C,H,W) with 1 or 3 "
            f"channels, found {a.shape}"
        )
    if a.shape[0] == 0:
        raise DataError(f"{where}: holds no images")
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0).copy()
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float, found dtype {a.dtype}")
    a = a.astype(np.float32)
    bad = int((~np.isfinite(a) | (a < 0) | (a > 1)).reshape(len(a), -1).any(axis=1).sum())
    if bad:
        raise DataError(f"{where}: {bad} float images have values outside [0, 1]")
    return np.ascontiguousarray(a)


def _read_npz(path: Path, channels: int, n_classes: int) -> dict[str, np.ndarray]:
    if Path(path).exists():
        check_npz_sizes(Path(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as err:
        raise DataError(f"MedMNIST file {path} does not exist") from err
    except NPZ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz file: {npz_problem(err)}") from err
    want = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in want if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}")
    shape = (28, 28) if channels == 1 else (28, 28, channels)
    for s in SPLITS:
        img, lab = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if img.dtype != np.uint8 or img.shape[1:] != shape:
            raise DataError(
                f"{path}: '{s}_images' must be uint8 of shape (N, {', '.join(map(str, shape))}), "
                f"found {img.dtype} {img.shape}"
            )
        if lab.shape not in ((len(img),), (len(img), 1)):
            raise DataError(
                f"{path}: '{s}_labels' must have shape ({len(img)}, 1), found {lab.shape}"
            )
        lab = lab.reshape(-1)
        bad = int(((lab < 0) | (lab >= n_classes)).sum())
        if bad:
            raise DataError(f"{path}: '{s}_labels' has {bad} labels outside 0..{n_classes - 1}")
    return arrays


def _spec(labels: tuple[str, ...], channels: int) -> DataSpec:
    return DataSpec("image", (channels, 28, 28), len(labels), labels)


def medmnist_spec(name: str) -> DataSpec:
    """What dataset `name` holds (image shape, classes, label names), without reading it."""
    _, labels, channels = _entry(name)
    return _spec(labels, channels)


def load_medmnist_split(
    name: str, split: str, data_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    """One official split: x float32 (N, C, 28, 28) in [0, 1], y int64 (N,)."""
    filename, labels, channels = _entry(name)
    if split not in SPLITS:
        raise DataError(f"MedMNIST split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir or DATA_DIR) / filename
    arrays = _read_npz(path, channels, len(labels))
    x = to_nchw(arrays[f"{split}_images"], str(path))
    y = arrays[f"{split}_labels"].reshape(-1).astype(np.int64)
    if name in CLASS_OF_FILE_LABEL:
        y = np.asarray(CLASS_OF_FILE_LABEL[name], dtype=np.int64)[y]
    return x, y, _spec(labels, channels)


def load_medmnist_sites(
    name: str, data_dir: Path | None = None
) -> tuple[DataSpec, list[SiteSplit]]:
    """The single natural site "all": official train, validation and test splits."""
    x_tr, y_tr, spec = load_medmnist_split(name, "train", data_dir)
    x_val, y_val, _ = load_medmnist_split(name, "val", data_dir)
    x_te, y_te, _ = load_medmnist_split(name, "test", data_dir)
    return spec, [SiteSplit(SITE, x_tr, y_tr, x_val, y_val, x_te, y_te)]


def _read_png_folder(folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow ships with matplotlib

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"{folder}: holds no .png files")
    images = []
    for p in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as opened:  # reads the header only
                    width, height = opened.size
                    if width * height > MAX_PIXELS:
                        raise DataError(f"{p}: the image is {width}x{height} pixels, above "
                                        f"the {MAX_PIXELS} pixels medfed decodes; refused")
                    mode = "RGB" if opened.mode in ("RGB", "RGBA", "P") else "L"
                    images.append(np.asarray(opened.convert(mode), dtype=np.uint8))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"{p}: the image is too large to decode safely; refused") from err
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{p}: not a readable PNG image") from err
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{folder}: the PNG images do not all have the same size and channels")
    return np.stack(images)


def load_image_file(path: str | Path) -> np.ndarray:
    """Images for prediction: .npz (key "images", else its first array), .npy, or a PNG folder.

    Returns float32 NCHW in [0, 1]; PNG files are read in file-name order. The caller checks
    the shape against the model's input.
    """
    path = Path(path)
    if path.is_dir():
        return to_nchw(_read_png_folder(path), str(path))
    if not path.exists():
        raise DataError(f"image file {path} does not exist")
    check_npz_sizes(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except NPZ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz/.npy file: {npz_problem(err)}") from err
    if isinstance(loaded, np.ndarray):  # a plain .npy array
        return to_nchw(loaded, str(path))
    with loaded as z:
        if not z.files:
            raise DataError(f"{path}: the .npz file holds no arrays")
        try:
            images = z["images"] if "images" in z.files else z[z.files[0]]
        except ValueError as err:  # an object array would need pickle
            raise DataError(f"{path}: holds pickled objects, which are not loaded") from err
        except NPZ_ERRORS as err:  # e.g. a CRC mismatch inside the archive
            raise DataError(f"{path}: not a readable .npz file: {npz_problem(err)}") from err
    return to_nchw(images, str(path))


def read_labelled_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's labelled images: arrays `images` and `labels` (float32 NCHW, int64)."""
    if Path(path).exists():
        check_npz_sizes(Path(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files or "labels" not in npz.files:
                raise DataError(f"{path}: expected arrays 'images' and 'labels', "
                                f"found {sorted(npz.files)}")
            images, labels = npz["images"], npz["labels"].reshape(-1)
    except NPZ_ERRORS as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable npz file: {npz_problem(err)}") from err
    return to_nchw(images, str(path)), labels.astype(np.int64)

"""Data sets for training: bundled ones (no download) and the user's files, split by seed.

Sources:

* bundled: ``digits`` (scikit-learn, 1797 8x8 images with values 0-16, 10 classes) and
  ``breast-cancer`` (569 rows x 30 features, 2 classes). Both ship inside scikit-learn.
* ``.npz`` with arrays ``X`` (N, ...) and ``y`` (N,); optional ``class_labels`` and, for
  tabular ``X`` (N, F), ``feature_names``.
* ``.csv`` with a header: numeric feature columns plus one label column (``label_column``,
  default ``label``).
* an image folder: one sub-folder per class holding PNG/JPEG files, grayscale or RGB, resized to
  ``image_size`` x ``image_size`` with Pillow; pixel values stay 0-255.

Tabular sources keep their column names (:attr:`Dataset.feature_names`, in input order), so the
exported model can say which feature goes where. ``digits`` is read straight from scikit-learn's
data file (no ``import sklearn``, which takes seconds); the other bundled set imports it.

Samples are kept as the source provides them (no scaling): the model's own ``InputNorm`` layer
normalizes, so a served model needs no client-side preprocessing. The layout is adapted to the
architecture: images (C, H, W) flatten to (C*H*W,) for ``mlp`` and to (C, H*W) for ``conv1d``;
tabular rows (F,) become (1, F) for ``conv1d``.

The train/validation split is stratified and deterministic given the seed: each class's samples
are permuted with ``numpy.random.default_rng(seed)`` and the first ``round(n_c * val_fraction)``
(at least one) go to validation.

Bad data raises :class:`BnfoldError` with one line naming the problem, before anything is written.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from bnfold.errors import BnfoldError

BUNDLED = ("digits", "breast-cancer")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_IMAGE_SIZE = 32
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class Dataset:
    """A split data set. ``X_*`` float32 with shape (N, *input_shape); ``y_*`` int64 class indices."""

    name: str
    X_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    X_val: NDArray[np.float32]
    y_val: NDArray[np.int64]
    class_labels: list[str]
    input_shape: tuple[int, ...]
    feature_names: list[str] | None = None  # tabular data: the columns of X, in order

    @property
    def num_classes(self) -> int:
        return len(self.class_labels)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel (axis 1) mean and std of the training split, float64. A (near-)constant channel,
        std <= 1e-6 x the data's largest magnitude, gets std 1 (it is only centered), as in
        scikit-learn's StandardScaler, so a rare non-zero value there is not blown up."""
        x = self.X_train.astype(np.float64)
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axis=axes)
        std = x.std(axis=axes)
        floor = 1e-6 * max(float(np.abs(x).max()), 1e-30)
        return mean.tolist(), np.where(std > floor, std, 1.0).tolist()


def load_dataset(
    name: str | None = None,
    *,
    path: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    label_column: str | None = None,
    image_size: int | None = None,
    arch: str | None = None,
) -> Dataset:
    """Load a bundled data set by ``name`` or the user's data at ``path``, split by ``seed``.

    ``arch`` (an :data:`bnfold.archs.ARCHITECTURES` name) selects the sample layout; without it the
    source's own layout is kept.
    """
    if (name is None) == (path is None):
        raise BnfoldError(f"give exactly one of a data set name ({', '.join(BUNDLED)}) or a data path")
    if not 0.0 < val_fraction < 1.0:
        raise BnfoldError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    features: list[str] | None = None
    if path is not None:
        x, y, labels, source, features = _read_path(Path(path), label_column=label_column, image_size=image_size)
    else:
        assert name is not None
        x, y, labels, features = _bundled(name)
        source = name
    _check_arrays(x, y, source)
    if features is not None and (x.ndim != 2 or len(features) != x.shape[1]):
        raise BnfoldError(f"{source}: {len(features)} feature names for samples of shape {list(x.shape[1:])}")
    codes, labels = _encode_labels(y, labels, source)
    x = _layout(x, arch, source)
    train_idx, val_idx = stratified_split(codes, val_fraction, seed, source)
    return Dataset(
        name=source,
        X_train=x[train_idx],
        y_train=codes[train_idx],
        X_val=x[val_idx],
        y_val=codes[val_idx],
        class_labels=labels,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        feature_names=features,
    )


def stratified_split(y: NDArray[np.int64], val_fraction: float, seed: int,
                     source: str = "data") -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices (train, val), sorted; every class contributes ``max(1, round(n_c * val_fraction))`` to val."""
    rng = np.random.default_rng(seed)
    train: list[NDArray[np.int64]] = []
    val: list[NDArray[np.int64]] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if idx.size < 2:
            raise BnfoldError(
                f"{source}: class {int(cls)} has only {idx.size} sample; each class needs at least 2 "
                "for a train/validation split"
            )
        idx = rng.permutation(idx)
        n_val = min(max(1, round(idx.size * val_fraction)), idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _bundled(name: str) -> tuple[NDArray[np.float32], NDArray[np.int64], list[str], list[str] | None]:
    if name == "digits":
        x, y = _digits()
        return x, y, [str(i) for i in range(10)], None
    if name == "breast-cancer":
        from sklearn import datasets

        bunch = datasets.load_breast_cancer()
        return (bunch.data.astype(np.float32), bunch.target.astype(np.int64), [str(t) for t in bunch.target_names],
                [str(f) for f in bunch.feature_names])
    raise BnfoldError(f"unknown data set {name!r}; bundled: {', '.join(BUNDLED)} (or give a path with --data)")


def _digits() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """scikit-learn's digits, (N, 1, 8, 8) with values 0-16, as ``load_digits`` reads them, without
    importing scikit-learn: the file is ``sklearn/datasets/data/digits.csv.gz`` (64 pixels, then the digit)."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    csv_file = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders
                     if (Path(f) / "datasets" / "data" / "digits.csv.gz").is_file()), None)
    if csv_file is None:  # another layout: let scikit-learn find it
        from sklearn import datasets

        bunch = datasets.load_digits()
        return bunch.images.astype(np.float32)[:, None, :, :], bunch.target.astype(np.int64)
    with gzip.open(csv_file, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32), data[:, -1].astype(np.int64)


def _read_path(path: Path, *, label_column: str | None, image_size: int | None
               ) -> tuple[NDArray[np.float32], NDArray[np.generic], list[str] | None, str, list[str] | None]:
    if not path.exists():
        raise BnfoldError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        return (*_read_image_folder(path, image_size or DEFAULT_IMAGE_SIZE), str(path), None)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y, labels, features = _read_npz(path)
        return x, y, labels, str(path), features
    if suffix == ".csv":
        x, y, features = _read_csv(path, label_column or "label")
        return x, y, None, str(path), features
    raise BnfoldError(f"{path}: unsupported data file type {suffix or '(none)'!r}; use .npz, .csv or an image folder")


def _read_npz(path: Path) -> tuple[NDArray[np.float32], NDArray[np.generic], list[str] | None, list[str] | None]:
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise BnfoldError(f"{path}: not a .npz file (no zip header); save with numpy.savez(path, X=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise BnfoldError(f"{path}: cannot read .npz without pickle ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BnfoldError(f"{path}: not a readable .npz file ({' '.join(str(exc).split())})") from None
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise BnfoldError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(sorted(arrays)) or 'none'}")
    x, y = arrays["X"], arrays["y"]
    if x.dtype.kind not in "biuf":
        raise BnfoldError(f"{path}: X must be numeric, got dtype {x.dtype}")
    labels = [str(v) for v in arrays["class_labels"].tolist()] if "class_labels" in arrays else None
    features = [str(v) for v in arrays["feature_names"].tolist()] if "feature_names" in arrays else None
    return x.astype(np.float32), y, labels, features


def _read_csv(path: Path, label_column: str) -> tuple[NDArray[np.float32], NDArray[np.generic], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise BnfoldError(f"{path}: not a UTF-8 text CSV file") from None
    rows = [row for row in rows if row]
    if not rows:
        raise BnfoldError(f"{path}: empty CSV file")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise BnfoldError(
            f"{path}: no label column {label_column!r}; columns: {', '.join(header)} (choose one with --label-column)"
        )
    if len(header) < 2:
        raise BnfoldError(f"{path}: no feature columns besides the label column {label_column!r}")
    body = rows[1:]
    if not body:
        raise BnfoldError(f"{path}: CSV has a header but no data rows")
    li = header.index(label_column)
    features = [h for i, h in enumerate(header) if i != li]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    y: list[str] = []
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise BnfoldError(f"{path}: line {r} has {len(row)} fields, header has {len(header)}")
        values = [v for i, v in enumerate(row) if i != li]
        for c, value in enumerate(values):
            try:
                x[r - 2, c] = float(value)
            except ValueError:
                raise BnfoldError(f"{path}: line {r}, column {features[c]!r}: not a number: {value!r}") from None
        y.append(row[li].strip())
    return x, _numeric_if_possible(y), features


def _numeric_if_possible(values: list[str]) -> NDArray[np.generic]:
    """Integer labels sort numerically (2 < 10); anything else sorts as text."""
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        return np.asarray(values, dtype=str)


def _read_image_folder(root: Path, size: int) -> tuple[NDArray[np.float32], NDArray[np.int64], list[str]]:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(size, int) or size < 1:
        raise BnfoldError(f"image_size must be a positive integer, got {size!r}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise BnfoldError(f"{root}: no class sub-folders (expected one folder of PNG/JPEG images per class)")
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(classes):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise BnfoldError(f"{root}: class folder {folder.name!r} has no PNG/JPEG images")
        files += [(p, index) for p in images]
    loaded: list[Image.Image] = []
    for p, _ in files:
        try:
            with Image.open(p) as img:
                img.load()
                loaded.append(img.copy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise BnfoldError(f"{p}: unreadable image ({' '.join(str(exc).split())})") from None
    mode = "L" if all(img.mode in _GRAY_MODES for img in loaded) else "RGB"
    arrays = []
    for image in loaded:
        converted = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        a = np.asarray(converted, dtype=np.float32)
        arrays.append(a[None] if mode == "L" else a.transpose(2, 0, 1))
    # stack keeps the transposed (channels-last) memory order; torch 2.13's CPU kernels crash on such
    # strides in training (heap corruption in the batch-norm backward), so make the batch C-contiguous
    x = np.ascontiguousarray(np.stack(arrays))
    y = np.asarray([index for _, index in files], dtype=np.int64)
    return x, y, [folder.name for folder in classes]


def _check_arrays(x: NDArray[np.float32], y: NDArray[np.generic], source: str) -> None:
    if x.ndim < 2:
        raise BnfoldError(f"{source}: X must have shape (N, ...) with at least 2 dimensions, got {x.shape}")
    if y.ndim != 1:
        raise BnfoldError(f"{source}: y must have shape (N,), got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise BnfoldError(f"{source}: X has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise BnfoldError(f"{source}: no samples")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BnfoldError(f"{source}: X has {int(bad.sum())} NaN/inf value(s), first at index {first}")
    if y.dtype.kind == "f":
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)):
            raise BnfoldError(f"{source}: y has NaN/inf labels")
        if not np.all(yf == np.round(yf)):
            raise BnfoldError(f"{source}: y must hold class labels (integers or strings), got non-integer floats")


def _encode_labels(y: NDArray[np.generic], labels: list[str] | None,
                   source: str) -> tuple[NDArray[np.int64], list[str]]:
    """Map labels to 0..K-1 in sorted order. ``labels`` names the classes of integer codes 0..K-1."""
    values, codes = np.unique(y, return_inverse=True)
    if values.size < 2:
        shown = values[0].item() if values.size else None
        raise BnfoldError(f"{source}: only one class ({shown!r}); a classifier needs at least 2")
    if labels is not None:
        if y.dtype.kind not in "iuf" or values.min() < 0 or values.max() >= len(labels):
            raise BnfoldError(
                f"{source}: class_labels has {len(labels)} names but y holds {values.tolist()[:5]}...; "
                "y must be integer codes 0..len(class_labels)-1"
            )
        if values.size < len(labels):
            absent = sorted(set(range(len(labels))) - {int(v) for v in values})
            raise BnfoldError(f"{source}: classes {absent} of class_labels have no samples")
        return codes.astype(np.int64), labels
    names = [str(int(v)) if isinstance(v, np.floating | float) else str(v) for v in values.tolist()]
    return codes.astype(np.int64), names


def _layout(x: NDArray[np.float32], arch: str | None, source: str) -> NDArray[np.float32]:
    """Reshape samples to the architecture's input rank (see the module docstring)."""
    if arch is None:
        return x
    from bnfold.archs import get_arch

    rank = get_arch(arch).input_rank
    sample = x.shape[1:]
    if len(sample) == rank:
        return x
    if rank == 1:
        return x.reshape(x.shape[0], math.prod(sample))
    if rank == 2 and len(sample) == 3:
        return x.reshape(x.shape[0], sample[0], sample[1] * sample[2])
    if rank == 2 and len(sample) == 1:
        return x[:, None, :]
    kind = {1: "tabular", 2: "sequence", 3: "image"}.get(len(sample), f"{len(sample)}-d")
    raise BnfoldError(
        f"{arch} needs image inputs (C, H, W) but {source} has {kind} samples of shape {sample}; "
        "use --arch mlp (tabular) or conv1d (sequences)"
    )

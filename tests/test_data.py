"""Data sets: bundled ones, every user format, the seeded stratified split, and every bad-data error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnfold.data import load_dataset, stratified_split
from bnfold.errors import BnfoldError


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        pytest.param(None, (1, 8, 8), id="native"),
        pytest.param("cnn", (1, 8, 8), id="cnn"),
        pytest.param("mlp", (64,), id="mlp"),
        pytest.param("conv1d", (1, 64), id="conv1d"),
    ],
)
def test_digits_layout_per_architecture(arch: str | None, shape: tuple[int, ...]) -> None:
    data = load_dataset("digits", arch=arch)
    assert data.input_shape == shape
    assert data.X_train.shape[1:] == shape and data.X_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert len(data.X_train) + len(data.X_val) == 1797
    assert data.class_labels == [str(i) for i in range(10)]
    assert data.X_train.min() == 0.0 and data.X_train.max() == 16.0  # raw pixels: the model normalizes


def test_digits_without_importing_sklearn_are_sklearns_digits() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from bnfold.data import _digits

    x, y = _digits()
    bunch = load_digits()
    np.testing.assert_array_equal(x, bunch.images.astype(np.float32)[:, None])
    np.testing.assert_array_equal(y, bunch.target)
    code = "import sys; from bnfold.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"  # the import costs seconds; the file is all that is needed


def test_breast_cancer_is_tabular() -> None:
    data = load_dataset("breast-cancer", arch="mlp")
    assert data.input_shape == (30,)
    assert data.class_labels == ["malignant", "benign"]
    assert data.feature_names is not None and data.feature_names[:2] == ["mean radius", "mean texture"]
    assert len(data.feature_names) == 30
    assert len(data.y_train) + len(data.y_val) == 569
    assert load_dataset("breast-cancer", arch="conv1d").input_shape == (1, 30)


def test_image_arch_on_tabular_data_says_which_arch_fits() -> None:
    with pytest.raises(BnfoldError, match=r"cnn needs image inputs \(C, H, W\) but breast-cancer has tabular"):
        load_dataset("breast-cancer", arch="cnn")


def test_channel_stats_leave_constant_channels_unscaled() -> None:
    data = load_dataset("digits", arch="mlp")
    mean, std = data.channel_stats()
    x = data.X_train.astype(np.float64)
    assert x[:, 0].std() == 0.0 and std[0] == 1.0 and mean[0] == 0.0  # the top-left pixel is always blank
    np.testing.assert_allclose(std[10], x[:, 10].std(), rtol=1e-12)
    np.testing.assert_allclose(mean[10], x[:, 10].mean(), rtol=1e-12)


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    y = np.repeat(np.arange(3), [10, 20, 50]).astype(np.int64)
    train_a, val_a = stratified_split(y, 0.2, seed=7)
    train_b, val_b = stratified_split(y, 0.2, seed=7)
    _, val_c = stratified_split(y, 0.2, seed=8)
    np.testing.assert_array_equal(val_a, val_b)
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert set(train_a).isdisjoint(val_a) and len(train_a) + len(val_a) == len(y)
    assert np.bincount(y[val_a]).tolist() == [2, 4, 10]


def test_digits_split_depends_on_seed_only() -> None:
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.X_val, b.X_val)
    assert not np.array_equal(a.X_val, c.X_val)


# ---- user formats -------------------------------------------------------------------------------


def _xy(n: int = 40, features: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), np.arange(n) % 2


def test_npz(tmp_path: Path) -> None:
    x, y = _xy()
    np.savez(tmp_path / "d.npz", X=x, y=y)
    data = load_dataset(path=tmp_path / "d.npz", arch="mlp")
    assert data.input_shape == (5,) and data.class_labels == ["0", "1"]
    got = np.concatenate([data.X_train, data.X_val])
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(x, axis=0))


def test_npz_with_class_names_and_image_samples(tmp_path: Path) -> None:
    x = np.random.default_rng(1).uniform(0, 255, size=(30, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x, y=np.arange(30) % 3, class_labels=np.array(["cat", "dog", "owl"]))
    data = load_dataset(path=str(tmp_path / "d.npz"), arch="resnet")
    assert data.input_shape == (3, 6, 6) and data.class_labels == ["cat", "dog", "owl"]


def test_csv_with_default_and_named_label_column(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{i * 0.5},{'yes' if i % 2 else 'no'}" for i in range(20)]
    (tmp_path / "t.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")  # with a BOM
    data = load_dataset(path=tmp_path / "t.csv", arch="mlp")
    assert data.input_shape == (2,) and data.class_labels == ["no", "yes"]
    assert data.feature_names == ["a", "b"]  # the columns in input order, the label column left out
    rows = ["kind,a,b"] + [f"{i % 3 * 5},{i},{-i}" for i in range(30)]
    (tmp_path / "k.csv").write_text("\n".join(rows))
    data = load_dataset(path=tmp_path / "k.csv", label_column="kind")
    assert data.class_labels == ["0", "5", "10"]  # integer labels sort numerically
    x = np.concatenate([data.X_train, data.X_val])
    y = np.concatenate([data.y_train, data.y_val])
    np.testing.assert_array_equal(x[:, 1], -x[:, 0])
    np.testing.assert_array_equal(y, (x[:, 0].astype(int) % 3))


def _image_folder(root: Path, spec: dict[str, list[tuple[str, str, tuple[int, int]]]]) -> Path:
    rng = np.random.default_rng(0)
    for cls, files in spec.items():
        (root / cls).mkdir(parents=True)
        for name, mode, size in files:
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / cls / name)
    return root


@pytest.mark.parametrize(
    ("mode", "ext", "channels"),
    [
        pytest.param("L", "png", 1, id="gray-png"),
        pytest.param("RGB", "png", 3, id="rgb-png"),
        pytest.param("L", "jpg", 1, id="gray-jpeg"),
        pytest.param("RGB", "jpeg", 3, id="rgb-jpeg"),
    ],
)
def test_image_folder(tmp_path: Path, mode: str, ext: str, channels: int) -> None:
    files = [(f"{i}.{ext}", mode, (10 + i, 12)) for i in range(3)]  # different sizes: resized
    root = _image_folder(tmp_path / "imgs", {"circle": files, "square": files})
    data = load_dataset(path=root, image_size=8, arch="cnn")
    assert data.input_shape == (channels, 8, 8)
    assert data.class_labels == ["circle", "square"]
    assert len(data.X_train) + len(data.X_val) == 6
    assert data.X_train.min() >= 0.0 and data.X_train.max() <= 255.0


def test_image_folder_mixing_gray_and_rgb_becomes_rgb(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", {
        "a": [("0.png", "L", (8, 8)), ("1.jpg", "RGB", (8, 8))],
        "b": [("0.png", "RGB", (8, 8)), ("1.png", "L", (8, 8))],
    })
    assert load_dataset(path=root, image_size=4).input_shape == (3, 4, 4)


def test_image_folder_pixels_are_preserved_without_resizing(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, value in (("dark", 10), ("light", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), value + i, dtype=np.uint8), "L").save(root / cls / f"{i}.png")
    data = load_dataset(path=root, image_size=4, val_fraction=0.5)
    x = np.concatenate([data.X_train, data.X_val])
    y = np.concatenate([data.y_train, data.y_val])
    assert sorted(float(v) for v in x[:, 0, 0, 0]) == [10.0, 11.0, 200.0, 201.0]
    np.testing.assert_array_equal(y, (x[:, 0, 0, 0] > 100).astype(np.int64))


# ---- bad data -----------------------------------------------------------------------------------


def _write(tmp_path: Path, case: str) -> Path:
    x, y = _xy()
    if case == "missing":
        return tmp_path / "nope.npz"
    if case == "npz-no-y":
        np.savez(tmp_path / "d.npz", X=x)
        return tmp_path / "d.npz"
    if case == "npz-object":
        np.savez(tmp_path / "d.npz", X=np.array([{"a": 1}] * 40, dtype=object), y=y)
        return tmp_path / "d.npz"
    if case == "npz-corrupt":
        (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 not really a zip")
        return tmp_path / "d.npz"
    if case == "npz-text":
        (tmp_path / "d.npz").write_text("X,y\n1,2\n")
        return tmp_path / "d.npz"
    if case == "single-class":
        np.savez(tmp_path / "d.npz", X=x, y=np.zeros(40, dtype=np.int64))
        return tmp_path / "d.npz"
    if case in ("nan", "inf"):
        x[3, 2] = np.nan if case == "nan" else np.inf
        np.savez(tmp_path / "d.npz", X=x, y=y)
        return tmp_path / "d.npz"
    if case == "length-mismatch":
        np.savez(tmp_path / "d.npz", X=x, y=y[:-1])
        return tmp_path / "d.npz"
    if case == "one-sample-class":
        np.savez(tmp_path / "d.npz", X=x, y=np.r_[np.zeros(39, dtype=np.int64), 1])
        return tmp_path / "d.npz"
    if case == "suffix":
        (tmp_path / "d.parquet").write_bytes(b"x")
        return tmp_path / "d.parquet"
    if case == "csv-no-label":
        (tmp_path / "t.csv").write_text("a,b,target\n1,2,0\n3,4,1\n")
        return tmp_path / "t.csv"
    if case == "csv-text-value":
        (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,four,1\n")
        return tmp_path / "t.csv"
    if case == "csv-missing-value":
        (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,,1\n")
        return tmp_path / "t.csv"
    if case == "csv-nan":
        (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,nan,1\n1,2,0\n3,4,1\n")
        return tmp_path / "t.csv"
    if case == "csv-ragged":
        (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,1\n")
        return tmp_path / "t.csv"
    if case == "csv-empty":
        (tmp_path / "t.csv").write_text("")
        return tmp_path / "t.csv"
    if case == "csv-header-only":
        (tmp_path / "t.csv").write_text("a,b,label\n")
        return tmp_path / "t.csv"
    if case == "empty-folder":
        (tmp_path / "imgs").mkdir()
        return tmp_path / "imgs"
    if case == "empty-class-folder":
        _image_folder(tmp_path / "imgs", {"a": [("0.png", "L", (4, 4))]})
        (tmp_path / "imgs" / "b").mkdir()
        return tmp_path / "imgs"
    if case == "unreadable-image":
        root = _image_folder(tmp_path / "imgs", {"a": [("0.png", "L", (4, 4))], "b": [("0.png", "L", (4, 4))]})
        (root / "b" / "1.png").write_bytes(b"\x89PNG broken")
        return root
    if case == "single-class-folder":
        return _image_folder(tmp_path / "imgs", {"a": [("0.png", "L", (4, 4)), ("1.png", "L", (4, 4))]})
    raise AssertionError(case)


BAD = [
    pytest.param("missing", r"data path '.*nope\.npz' does not exist", id="missing-file"),
    pytest.param("npz-no-y", r"missing array\(s\) y; found X", id="npz-missing-array"),
    pytest.param("npz-object", r"cannot read \.npz without pickle", id="npz-object-array"),
    pytest.param("npz-corrupt", r"not a readable \.npz file", id="npz-corrupt"),
    pytest.param("npz-text", r"not a \.npz file \(no zip header\)", id="npz-text"),
    pytest.param("single-class", r"only one class \(0\); a classifier needs at least 2", id="single-class"),
    pytest.param("nan", r"X has 1 NaN/inf value\(s\), first at index \(3, 2\)", id="nan"),
    pytest.param("inf", r"X has 1 NaN/inf value\(s\), first at index \(3, 2\)", id="inf"),
    pytest.param("length-mismatch", r"X has 40 samples but y has 39", id="length-mismatch"),
    pytest.param("one-sample-class", r"class 1 has only 1 sample", id="class-with-one-sample"),
    pytest.param("suffix", r"unsupported data file type '\.parquet'", id="unsupported-suffix"),
    pytest.param("csv-no-label", r"no label column 'label'; columns: a, b, target \(choose one with --label-column\)",
                 id="csv-missing-label-column"),
    pytest.param("csv-text-value", r"line 3, column 'b': not a number: 'four'", id="csv-text-value"),
    pytest.param("csv-missing-value", r"line 3, column 'b': not a number: ''", id="csv-missing-value"),
    pytest.param("csv-nan", r"X has 1 NaN/inf value\(s\), first at index \(1, 1\)", id="csv-nan"),
    pytest.param("csv-ragged", r"line 3 has 2 fields, header has 3", id="csv-ragged-row"),
    pytest.param("csv-empty", r"empty CSV file", id="csv-empty"),
    pytest.param("csv-header-only", r"CSV has a header but no data rows", id="csv-header-only"),
    pytest.param("empty-folder", r"no class sub-folders", id="empty-folder"),
    pytest.param("empty-class-folder", r"class folder 'b' has no PNG/JPEG images", id="empty-class-folder"),
    pytest.param("unreadable-image", r"1\.png: unreadable image", id="unreadable-image"),
    pytest.param("single-class-folder", r"only one class \(0\)", id="single-class-folder"),
]


@pytest.mark.parametrize(("case", "pattern"), BAD)
def test_bad_data_is_one_line_bnfold_error(tmp_path: Path, case: str, pattern: str) -> None:
    path = _write(tmp_path, case)
    with pytest.raises(BnfoldError, match=pattern) as info:
        load_dataset(path=path, image_size=4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        pytest.param({"name": "mnist"}, r"unknown data set 'mnist'; bundled: digits, breast-cancer", id="unknown-name"),
        pytest.param({}, r"give exactly one of a data set name", id="neither"),
        pytest.param({"name": "digits", "val_fraction": 1.0}, r"val_fraction must be between 0 and 1", id="val-1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(BnfoldError, match=pattern):
        load_dataset(**kwargs)  # type: ignore[arg-type]

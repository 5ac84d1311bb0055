"""Tests of mutualkd.data: loading each data set and device-resident batching."""

from __future__ import annotations

from collections.abc import Callable
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mutualkd.config import DataConfig
from mutualkd.data import (
    FASHION_MNIST_SYSTEM_DIR,
    IDX_FILES,
    BatchLoader,
    DatasetInfo,
    Split,
    augment_batch,
    list_datasets,
    load_dataset,
    read_idx,
    write_idx,
)
from mutualkd.data.lookup import register_dataset
from mutualkd.errors import DataError, UserError, in_file

Writer = Callable[..., Path]  # the factory fixtures of conftest.py: write_fake_cifar, write_fake_mnist
BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "image_tar")

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split, DatasetInfo]:
    return load_dataset(DataConfig(dataset="digits"))


def _toy(n: int = 37, c: int = 3, h: int = 6, w: int = 5, classes: int = 4) -> tuple[Split, DatasetInfo]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    info = DatasetInfo("toy", classes, c, (h, w), (0.5,) * c, (0.25,) * c, "crop_flip", 2)
    return Split(images, labels), info


def _collect(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# --------------------------------------------------------------------------- digits


def test_digits_shapes_classes_and_split(digits: tuple[Split, Split, DatasetInfo]) -> None:
    train, test, info = digits
    assert info.name == "digits" and info.num_classes == 10 and info.in_chans == 1
    assert info.image_size == (8, 8) and info.augment == "crop" and info.padding == 1
    assert train.images.shape == (1347, 1, 8, 8) and test.images.shape == (450, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # stratified: every class has about a quarter of its samples in the test split
    all_counts = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    assert torch.all((test_counts - all_counts * 0.25).abs() <= 1)
    assert len(info.mean) == len(info.std) == 1 and 0 < info.mean[0] < 1 and info.std[0] > 0


def test_digits_split_does_not_depend_on_seed(digits: tuple[Split, Split, DatasetInfo]) -> None:
    train, test, _ = digits
    train7, test7, _ = load_dataset(DataConfig(dataset="digits"), seed=7)
    assert torch.equal(test.images, test7.images) and torch.equal(test.labels, test7.labels)
    assert torch.equal(train.images, train7.images)


def test_subsets_are_stratified_and_deterministic() -> None:
    cfg = DataConfig(dataset="digits", train_subset=200, test_subset=100)
    a_train, a_test, _ = load_dataset(cfg, seed=3)
    b_train, b_test, _ = load_dataset(cfg, seed=3)
    c_train, c_test, _ = load_dataset(cfg, seed=4)
    assert len(a_train) == 200 and len(a_test) == 100
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.images, c_train.images)  # the train subset follows the seed
    assert torch.equal(a_test.images, c_test.images)  # the test subset does not
    counts = torch.bincount(a_train.labels, minlength=10)
    assert int(counts.min()) >= 19 and int(counts.max()) <= 21
    # a subset larger than the split keeps the whole split
    full, _, _ = load_dataset(DataConfig(dataset="digits", train_subset=100_000))
    assert len(full) == 1347


def test_subset_seed_fixes_the_train_subset_across_run_seeds() -> None:
    fixed = DataConfig(dataset="digits", train_subset=200, subset_seed=11)
    a, _, _ = load_dataset(fixed, seed=3)
    b, _, _ = load_dataset(fixed, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # it is the subset that run seed 11 would draw, and not the one of run seed 3
    own, _, _ = load_dataset(DataConfig(dataset="digits", train_subset=200), seed=11)
    other, _, _ = load_dataset(DataConfig(dataset="digits", train_subset=200), seed=3)
    assert torch.equal(a.images, own.images) and not torch.equal(a.images, other.images)


def test_image_size_resizes_and_scales_padding() -> None:
    train, test, info = load_dataset(DataConfig(dataset="digits", image_size=16, test_subset=20))
    assert train.images.shape[1:] == (1, 16, 16) and test.images.shape == (20, 1, 16, 16)
    assert train.images.dtype == torch.uint8
    assert info.image_size == (16, 16) and info.padding == 2


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    arr = (
        (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
        if dtype != np.uint8
        else (np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    )
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    if suffix == ".gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
        assert gzip.decompress(path.read_bytes())[3] == 3


def test_idx_header_layout(tmp_path: Path) -> None:
    write_idx(tmp_path / "img", np.zeros((2, 28, 27), dtype=np.uint8))
    raw = (tmp_path / "img").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert int.from_bytes(raw[:4], "big") == 0x00000803
    assert [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3)] == [2, 28, 27]
    assert len(raw) == 16 + 2 * 28 * 27


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_raises_data_error_naming_file(tmp_path: Path, gz: bool, write_fake_mnist: Writer) -> None:
    write_fake_mnist(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    if gz:
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[:-100]))  # a valid gzip of a short IDX file
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    msg = str(exc.value)
    expected = 16 + 30 * 28 * 28
    assert name in msg and "truncated" in msg
    assert str(expected) in msg and str(expected - 100) in msg
    assert exc.value.hint


def test_truncated_gzip_stream_raises_data_error(tmp_path: Path, write_fake_mnist: Writer) -> None:
    write_fake_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_wrong_magic_raises_data_error(tmp_path: Path, write_fake_mnist: Writer) -> None:
    write_fake_mnist(tmp_path)
    # an image file where the label file should be: magic 0x803 instead of 0x801
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((30, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"0x00000803.*0x00000801"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


@pytest.mark.parametrize("gz", [False, True])
def test_fake_mnist_loads(tmp_path: Path, gz: bool, write_fake_mnist: Writer) -> None:
    write_fake_mnist(tmp_path / "MNIST" / "raw", gz=gz)  # torchvision's layout under root
    train, test, info = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (12, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [i % 10 for i in range(30)]
    assert info == DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), "crop", 2)


def test_missing_fashion_mnist_lists_files(tmp_path: Path, write_fake_mnist: Writer) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    msg = str(exc.value)
    for fname in IDX_FILES:
        assert str(tmp_path / fname) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
    # a partial folder names only what is missing
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    assert (
        "t10k-labels-idx1-ubyte" in str(exc.value) and "train-images-idx3-ubyte" not in str(exc.value).split("fix:")[0]
    )


def test_fashion_mnist_looks_in_system_folder_only_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_fake_mnist: Writer
) -> None:
    monkeypatch.chdir(tmp_path)  # so ./data is empty
    system = tmp_path / "system"
    write_fake_mnist(system, gz=True)
    monkeypatch.setattr("mutualkd.data.idx.FASHION_MNIST_SYSTEM_DIR", system)
    train, _, info = load_dataset(DataConfig(dataset="fashion_mnist"))
    assert len(train) == 30 and info.mean == (0.2860,) and info.std == (0.3530,)
    with pytest.raises(DataError):
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "elsewhere")))


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    train, test, info = load_dataset(DataConfig(dataset="fashion_mnist"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert abs(float(train.images[:5000].float().mean()) / 255 - info.mean[0]) < 0.02


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(("kind", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_fake_cifar_loads(tmp_path: Path, kind: str, classes: int, write_fake_cifar: Writer) -> None:
    folder = write_fake_cifar(tmp_path, kind, n_train=53, n_test=21, seed=1)
    train, test, info = load_dataset(DataConfig(dataset=kind, root=str(tmp_path)))
    assert train.images.shape == (53, 3, 32, 32) and test.images.shape == (21, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert info.num_classes == classes and info.in_chans == 3 and info.image_size == (32, 32)
    assert info.augment == "crop_flip" and info.padding == 4 and len(info.mean) == 3
    # torchvision's layout: rows of 3072 = R plane, G plane, B plane (row-major 32x32)
    import pickle

    name = "test_batch" if kind == "cifar10" else "test"
    with open(folder / name, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (21, 3072)
    np.testing.assert_array_equal(test.images[3, 1].numpy().reshape(-1), raw[b"data"][3, 1024:2048])
    key = b"labels" if kind == "cifar10" else b"fine_labels"
    assert test.labels.tolist() == raw[key]
    if kind == "cifar100":
        assert b"coarse_labels" in raw


def test_missing_cifar_names_files_and_fixes(tmp_path: Path, write_fake_cifar: Writer) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    msg = str(exc.value)
    for fname in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        assert str(tmp_path / "cifar-10-batches-py" / fname) in msg
    assert "download = true" in msg and "cifar-10-python.tar.gz" in msg and "data.root" in msg
    write_fake_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match="cifar-100-python/meta"):
        load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))


def test_cifar_download_failure_is_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", no_network)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    msg = str(exc.value)
    assert "network is unreachable" in msg and "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg


def test_corrupt_cifar_pickle_is_data_error(tmp_path: Path, write_fake_cifar: Writer) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_default_root_is_dot_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_fake_cifar: Writer) -> None:
    monkeypatch.chdir(tmp_path)
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=10, n_test=5)
    train, test, _ = load_dataset(DataConfig(dataset="cifar10"))
    assert len(train) == 10 and len(test) == 5


# --------------------------------------------------------------------------- image folder


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), mode="L").save(tmp_path / "train" / "dog" / "g.jpg")
    with pytest.raises(DataError, match="image_size"):
        load_dataset(DataConfig(dataset="image_folder", root=str(tmp_path)))
    train, test, info = load_dataset(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=16))
    assert train.images.shape == (7, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and info.num_classes == 2
    assert info.augment == "crop_flip" and info.padding == 2 and len(info.mean) == 3
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        load_dataset(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=16))


def test_data_error_is_user_error() -> None:
    assert issubclass(DataError, UserError)


# --------------------------------------------------------------------------- the name table, errors on fields


def test_dataset_table_is_the_recipe_schema() -> None:
    # every name the recipe schema admits has a loader, and no loader is unreachable: the schema
    # admits exactly the installed data set plugins (the built-ins among them)
    admitted = [n for n in BUILTIN_DATASETS if DataConfig(dataset=n).dataset == n]
    assert sorted(admitted) == sorted(BUILTIN_DATASETS)
    assert set(admitted) <= set(list_datasets())
    for name in list_datasets():
        assert DataConfig(dataset=name).dataset == name
    with pytest.raises(ValueError, match="unknown data set 'cifar11'"):
        DataConfig(dataset="cifar11")


def test_unknown_dataset_is_data_error_on_the_field() -> None:
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig.model_construct(dataset="cifar11"))  # past the schema, as a plugin might
    assert exc.value.field == "data.dataset" and exc.value.where is None
    assert str(exc.value).startswith("[data.dataset]: unknown data set 'cifar11'")
    assert "did you mean 'cifar10'" in str(exc.value)


def test_a_name_registered_twice_names_both_loaders() -> None:
    def digits(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"'digits' is registered twice: mutualkd\.data\.digits\.digits and test_data"):
        register_dataset(digits)
    assert load_dataset(DataConfig(dataset="digits", test_subset=10))[1].labels.shape == (10,)  # the table is intact


def test_cifar_statistics_have_one_owner() -> None:
    from mutualkd.data import cifar
    from mutualkd.models import _register

    assert _register.CIFAR10_MEAN is cifar.CIFAR10_MEAN and _register.CIFAR100_STD is cifar.CIFAR100_STD
    cfg = _register.cifar_default_cfgs(("x",), paper_name="p", paper_ids="i")
    assert cfg["x"].cfgs["cifar100"].mean == cifar.CIFAR100_MEAN


def test_user_error_keeps_where_and_hint() -> None:
    e = UserError("no such folder", where="runs/x", hint="name a run folder")
    assert e.field is None and str(e) == "runs/x: no such folder\n  fix: name a run folder"
    assert str(in_file(e, "r.toml")) == str(e)  # it already says where it is
    assert str(UserError("bare")) == "bare"


def test_batch_size_error_carries_the_field_and_in_file_names_the_recipe() -> None:
    split, info = _toy(n=7)
    with pytest.raises(DataError) as exc:
        BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=False, seed=0)
    err = exc.value
    assert err.field == "data.batch_size" and err.where is None
    assert str(err).startswith("[data.batch_size]: the train split has 7 samples")
    assert in_file(err, "recipes/r.toml") is err
    assert err.where == "recipes/r.toml [data.batch_size]"
    text = str(err)
    assert text.startswith("recipes/r.toml [data.batch_size]: the train split has 7 samples") and "\n  fix: lower" in text
    assert str(in_file(err, "other.toml")) == text  # placed once, not twice


@pytest.mark.parametrize(
    ("layout", "image_size", "field", "says"),
    [
        ("train+test", None, "data.image_size", "image_folder needs an image size"),
        (None, 16, "data.root", "image_folder needs the folder"),
        ("test", 16, "data.root", "image_folder: missing folder(s)"),
    ],
)
def test_image_folder_field_errors(
    tmp_path: Path, layout: str | None, image_size: int | None, field: str, says: str
) -> None:
    for split in (layout or "").split("+"):
        if split:
            (tmp_path / split / "a").mkdir(parents=True)
    cfg = DataConfig(dataset="image_folder", root=None if layout is None else str(tmp_path), image_size=image_size)
    with pytest.raises(DataError) as exc:
        load_dataset(cfg)
    assert exc.value.field == field
    assert str(in_file(exc.value, "r.toml")).startswith(f"r.toml [{field}]: {says}")


def test_download_failure_carries_the_download_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "FashionMNIST", no_network)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=True))
    assert exc.value.field == "data.download"
    text = str(in_file(exc.value, "r.toml"))
    assert text.startswith(f"r.toml [data.download]: downloading fashion_mnist into {tmp_path} failed")
    assert "apt-get install dataset-fashion-mnist" in text and "set download = false" in text


def test_data_file_errors_name_the_file_not_the_recipe(tmp_path: Path, write_fake_cifar: Writer) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert exc.value.field is None
    text = str(in_file(exc.value, "r.toml"))
    assert text.startswith(f"{folder / 'test_batch'}: not a readable CIFAR pickle") and "r.toml" not in text


def test_validate_names_recipe_file_and_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mutualkd.cli import app

    recipe = tmp_path / "folder.toml"
    recipe.write_text(
        f'[data]\ndataset = "image_folder"\nroot = "{tmp_path.as_posix()}"\n'
        + '\n[[peers]]\nmodel = "cifar_resnet20"\n' * 2,
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["validate", str(recipe)], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert f"{recipe} [data.image_size]: image_folder needs an image size" in result.stderr
    assert "fix: set image_size in [data]" in result.stderr


# --------------------------------------------------------------------------- BatchLoader


def test_batches_shapes_dtypes_and_normalisation(digits: tuple[Split, Split, DatasetInfo]) -> None:
    train, test, info = digits
    loader = BatchLoader(test, info, batch_size=100, device="cpu", train=False, augment=True, seed=0)
    assert len(loader) == 5 and loader.num_samples == 450
    batches = _collect(loader)
    assert [x.shape[0] for x, _ in batches] == [100, 100, 100, 100, 50]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (450, 1, 8, 8)
    expected = (test.images.float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x, expected)  # evaluation: no shuffle, no augmentation
    assert torch.equal(y, test.labels)
    tl = BatchLoader(train, info, batch_size=64, device=torch.device("cpu"), train=True, augment=True, seed=0)
    assert len(tl) == 1347 // 64 and tl.num_samples == 1347 // 64 * 64
    xb, yb = next(iter(tl))
    assert xb.shape == (64, 1, 8, 8) and yb.shape == (64,)


def test_train_drop_last_false_keeps_remainder() -> None:
    split, info = _toy(n=37)
    loader = BatchLoader(split, info, batch_size=10, device="cpu", train=True, augment=False, seed=0, drop_last=False)
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes == [10, 10, 10, 7] and len(loader) == 4 and loader.num_samples == 37


def test_too_few_samples_for_a_batch_is_data_error() -> None:
    split, info = _toy(n=7)
    with pytest.raises(DataError, match="batch_size"):
        BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=False, seed=0)


def test_channels_last() -> None:
    split, info = _toy()
    for augment in (False, True):
        loader = BatchLoader(
            split, info, batch_size=8, device="cpu", train=True, augment=augment, seed=0, channels_last=True
        )
        x, _ = next(iter(loader))
        assert x.is_contiguous(memory_format=torch.channels_last)
        loader = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=augment, seed=0)
        x, _ = next(iter(loader))
        assert x.is_contiguous()


def test_set_epoch_determinism_and_epochs_differ() -> None:
    split, info = _toy()
    a = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=True, seed=5)
    b = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=True, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    ea, eb = _collect(a), _collect(b)
    assert len(ea) == len(a) == 4
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # iterating the same epoch again gives the same batches
    for (xa, ya), (xc, yc) in zip(ea, _collect(a)):
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    a.set_epoch(4)
    assert not torch.equal(a.indices(), b.indices())
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(_collect(a), ea))
    # another seed gives another order
    c = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=True, seed=6)
    c.set_epoch(3)
    assert not torch.equal(c.indices(), b.indices())


def test_train_order_is_the_documented_permutation() -> None:
    split, info = _toy(n=37)
    loader = BatchLoader(split, info, batch_size=4, device="cpu", train=True, augment=False, seed=2)
    loader.set_epoch(7)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(2 * 1_000_003 + 7))
    assert torch.equal(loader.indices(), perm[:36])
    y = torch.cat([yb for _, yb in loader])
    assert torch.equal(y, split.labels[perm[:36]])


@pytest.mark.parametrize("augment", [False, True])
def test_start_batch_resumes_exactly(augment: bool) -> None:
    split, info = _toy(n=50)
    loader = BatchLoader(split, info, batch_size=6, device="cpu", train=True, augment=augment, seed=11)
    loader.set_epoch(2)
    full = _collect(loader)
    assert len(full) == 8
    for k in (0, 1, 5, 8):
        fresh = BatchLoader(split, info, batch_size=6, device="cpu", train=True, augment=augment, seed=11)
        fresh.set_epoch(2)
        fresh.start_batch = k
        part = _collect(fresh)
        assert len(part) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], part):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert fresh.start_batch == 0  # reset after a full pass
        assert len(_collect(fresh)) == len(full)


def test_start_batch_not_reset_by_partial_iteration() -> None:
    split, info = _toy(n=50)
    loader = BatchLoader(split, info, batch_size=6, device="cpu", train=True, augment=True, seed=0)
    loader.start_batch = 3
    it = iter(loader)
    next(it)
    assert loader.start_batch == 3


def test_eval_ranks_cover_every_index_once() -> None:
    n = 23
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    split = Split(images, torch.arange(n))
    info = DatasetInfo("ids", n, 1, (2, 2), (0.0,), (1 / 255,), "crop_flip", 1)
    seen = []
    counts = []
    for rank in (0, 1):
        loader = BatchLoader(
            split, info, batch_size=5, device="cpu", train=False, augment=True, seed=0, rank=rank, world_size=2
        )
        ys = [y for _, y in loader]
        xs = [x for x, _ in loader]
        counts.append(loader.num_samples)
        assert len(ys) == len(loader)
        got = torch.cat(ys)
        assert torch.equal(got, torch.arange(rank, n, 2))
        assert torch.equal(torch.cat(xs)[:, 0, 0, 0].round().long(), got)  # no augmentation in evaluation
        seen.append(got)
    assert counts == [12, 11]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_train_ranks_get_disjoint_equal_shards() -> None:
    split, info = _toy(n=53)
    shards = []
    for rank in (0, 1):
        loader = BatchLoader(
            split, info, batch_size=4, device="cpu", train=True, augment=True, seed=9, rank=rank, world_size=2
        )
        loader.set_epoch(1)
        assert len(loader) == 6 and loader.num_samples == 24
        idx = loader.indices()
        assert torch.equal(torch.cat([y for _, y in loader]), split.labels[idx])
        shards.append(idx)
    assert shards[0].shape == shards[1].shape
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    perm = torch.randperm(53, generator=torch.Generator().manual_seed(9 * 1_000_003 + 1))[:52]
    assert torch.equal(shards[0], perm[0::2][:24]) and torch.equal(shards[1], perm[1::2][:24])
    # ranks also draw different augmentations: same seed, same batch index, different rank
    a = BatchLoader(split, info, batch_size=4, device="cpu", train=True, augment=True, seed=9, rank=0, world_size=2)
    b = BatchLoader(split, info, batch_size=4, device="cpu", train=True, augment=True, seed=9, rank=1, world_size=2)
    assert a._aug_generator(0).initial_seed() != b._aug_generator(0).initial_seed()


def test_crop_of_constant_image_is_constant() -> None:
    images = torch.full((16, 3, 8, 8), 77, dtype=torch.uint8)
    split = Split(images, torch.zeros(16, dtype=torch.int64))
    info = DatasetInfo("const", 1, 3, (8, 8), (0.0,) * 3, (1.0,) * 3, "crop_flip", 4)
    loader = BatchLoader(split, info, batch_size=16, device="cpu", train=True, augment=True, seed=0)
    x, _ = next(iter(loader))
    assert x.shape == (16, 3, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, 77 / 255))  # reflect padding keeps a constant image constant


def test_crop_flip_matches_reference_and_flips_some() -> None:
    split, info = _toy(n=64, h=7, w=9)
    idx = torch.arange(64)
    gen_seed = 123
    out = augment_batch(
        split.images, idx, padding=3, flip=True, pad_mode="reflect", generator=torch.Generator().manual_seed(gen_seed)
    )
    assert out.shape == (64, 3, 7, 9) and out.dtype == torch.uint8
    g = torch.Generator().manual_seed(gen_seed)
    oy = torch.randint(0, 7, (64,), generator=g)
    ox = torch.randint(0, 7, (64,), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert 0 < int(flips.sum()) < 64
    padded = F.pad(split.images.float(), (3, 3, 3, 3), mode="reflect")
    n_flipped_differs = 0
    for i in range(64):
        ref = padded[i, :, oy[i] : oy[i] + 7, ox[i] : ox[i] + 9]
        if flips[i]:
            ref = ref.flip(-1)
            n_flipped_differs += int(not torch.equal(out[i].float(), ref.flip(-1)))
        assert torch.equal(out[i].float(), ref), i
    assert n_flipped_differs > 0


def test_crop_zero_padding_matches_reference_and_never_flips() -> None:
    split, _ = _toy(n=40, c=1, h=8, w=8)
    out = augment_batch(
        split.images,
        torch.arange(40),
        padding=1,
        flip=False,
        pad_mode="zeros",
        generator=torch.Generator().manual_seed(0),
    )
    g = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 3, (40,), generator=g)
    ox = torch.randint(0, 3, (40,), generator=g)
    padded = F.pad(split.images, (1, 1, 1, 1))
    for i in range(40):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8])


def test_digits_augmentation_never_flips(digits: tuple[Split, Split, DatasetInfo]) -> None:
    train, _, info = digits
    # with padding 0 the crop is the identity, so any difference would be a flip: "crop" never flips
    zero_pad = DatasetInfo(info.name, 10, 1, (8, 8), info.mean, info.std, "crop", 0)
    loader = BatchLoader(train, zero_pad, batch_size=64, device="cpu", train=True, augment=True, seed=0)
    x, _ = next(iter(loader))
    expected = (train.images[loader.indices()[:64]].float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x, expected)


def test_augment_off_when_not_requested() -> None:
    split, info = _toy(n=32)
    for train, augment in ((True, False), (False, True)):
        loader = BatchLoader(split, info, batch_size=8, device="cpu", train=train, augment=augment, seed=0)
        x, _ = next(iter(loader))
        idx = loader.indices()[:8]
        torch.testing.assert_close(x, (split.images[idx].float() / 255 - 0.5) / 0.25)
    loader = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=True, seed=0)
    x, _ = next(iter(loader))
    assert not torch.allclose(x, (split.images[loader.indices()[:8]].float() / 255 - 0.5) / 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_equal_cpu_batches() -> None:
    split, info = _toy(n=50)
    cpu = BatchLoader(split, info, batch_size=8, device="cpu", train=True, augment=True, seed=3, channels_last=True)
    gpu = BatchLoader(split, info, batch_size=8, device="cuda", train=True, augment=True, seed=3, channels_last=True)
    assert gpu.images.device.type == "cuda"
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)

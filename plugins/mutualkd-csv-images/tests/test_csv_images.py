"""Tests of the example data set plugin: the CSV layouts and their errors on real PNG files,
both pipelines' views, and the installed distribution listed and trained on from the CLI."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch

from mutualkd.config import DataConfig
from mutualkd.data import DataSources, load_dataset
from mutualkd.errors import DataError
from mutualkd_csv_images import CsvImages
from mutualkd_csv_images.demo import NAMES, write_digits

PLUGIN = Path(__file__).resolve().parents[1]
RECIPE = PLUGIN / "examples" / "csv_images_cpu.toml"


def _sources(root: Path | str | None, **data: object) -> DataSources:
    return CsvImages().sources(DataConfig(dataset="csv_images", root=None if root is None else str(root), **data))


def _rewrite(csv_path: Path, rows: list[list[str]]) -> None:
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# --------------------------------------------------------------------------- the layouts


def test_one_csv_holds_out_a_fixed_stratified_test_split(tmp_path: Path) -> None:
    write_digits(tmp_path, n=200)
    src = _sources(tmp_path)
    assert src.classes == tuple(sorted(NAMES))  # names sort as text
    assert len(src.train) == 160 and len(src.test) == 40
    assert src.in_chans == 1 and src.image_size == (8, 8) and src.augment == "crop_flip"
    assert set(src.test.labels.tolist()) == set(range(10))  # every class is tested
    again = _sources(tmp_path)
    assert [src.test.name(i) for i in range(40)] == [again.test.name(i) for i in range(40)]
    # the sample is the file: its pixels, its label
    first = src.train.name(0)
    with Image.open(first) as img:
        assert np.array_equal(np.asarray(src.train.open(0)), np.asarray(img))
    rows = {r["filename"]: r["label"] for r in csv.DictReader(open(tmp_path / "labels.csv"))}
    assert src.classes[src.train.labels[0]] == rows[str(Path(first).relative_to(tmp_path))]


def test_train_and_test_folders_and_a_csv_file_as_root(tmp_path: Path) -> None:
    write_digits(tmp_path / "split", n=100, split=True)
    src = _sources(tmp_path / "split")
    assert (len(src.train), len(src.test)) == (80, 20)
    (tmp_path / "split" / "test").rename(tmp_path / "split" / "val")
    assert len(_sources(tmp_path / "split").test) == 20
    write_digits(tmp_path / "one", n=50)
    (tmp_path / "one" / "labels.csv").rename(tmp_path / "one" / "digits.csv")
    assert len(_sources(tmp_path / "one" / "digits.csv").train) == 40


def test_numeric_labels_sort_as_numbers_and_names_may_omit_the_suffix(tmp_path: Path) -> None:
    write_digits(tmp_path, n=60)
    rows = [["filename", "label"]] + [[f"images/{i:05d}", str(i % 12)] for i in range(60)]  # no .png
    _rewrite(tmp_path / "labels.csv", rows)
    src = _sources(tmp_path)
    assert src.classes == tuple(str(i) for i in range(12))


def test_device_pipeline_decodes_at_image_size(tmp_path: Path) -> None:
    write_digits(tmp_path, n=100)
    from mutualkd import registry
    from mutualkd.testing import registered

    registry.reset()
    with registered("dataset", "csv_images_local", CsvImages):
        train, test, info = load_dataset(DataConfig(dataset="csv_images_local", root=str(tmp_path), image_size=16))
    assert train.images.shape == (80, 1, 16, 16) and test.images.shape == (20, 1, 16, 16)
    assert train.images.dtype == torch.uint8 and info.num_classes == 10 and info.padding == 2
    assert info.image_size == (16, 16) and len(info.mean) == 1 and 0 < info.mean[0] < 1


def test_stream_pipeline_reads_the_files(tmp_path: Path) -> None:
    from mutualkd import registry
    from mutualkd.data import build_pipeline
    from mutualkd.testing import registered

    write_digits(tmp_path, n=100)
    registry.reset()
    with registered("dataset", "csv_images_local", CsvImages):
        cfg = DataConfig(dataset="csv_images_local", root=str(tmp_path), image_size=16, pipeline="stream",
                         num_workers=0, batch_size=8)
        pipe = build_pipeline(cfg, seed=0, device="cpu")
        x, y = next(iter(pipe.train))
    assert pipe.kind == "stream" and x.shape == (8, 1, 16, 16) and y.dtype == torch.int64
    assert pipe.input is not None and len(pipe.input.mean) == 1  # grey: ImageNet's statistics averaged


# --------------------------------------------------------------------------- errors the user can fix


def test_errors_name_the_file_line_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        _sources(None)
    assert exc.value.field == "data.root"
    with pytest.raises(DataError, match=r"no labels\.csv in"):
        _sources(tmp_path)
    write_digits(tmp_path, n=30)
    _rewrite(tmp_path / "labels.csv", [["filename", "label"], ["images/00000.png", "zero"], ["images/nope.png", "one"]])
    with pytest.raises(DataError, match=r"labels\.csv, line 3: the image .*nope\.png does not exist"):
        _sources(tmp_path)
    _rewrite(tmp_path / "labels.csv", [["file", "class"], ["images/00000.png", "zero"]])
    with pytest.raises(DataError, match="no column filename or label"):
        _sources(tmp_path)
    (tmp_path / "images" / "00001.png").write_bytes(b"not a png")
    _rewrite(tmp_path / "labels.csv", [["filename", "label"]] + [[f"images/{i:05d}.png", "x"] for i in range(10)])
    with pytest.raises(DataError, match=r"00001\.png: cannot be read as an image"):
        _sources(tmp_path)


def test_a_test_label_train_lacks_is_an_error(tmp_path: Path) -> None:
    write_digits(tmp_path, n=50, split=True)
    _rewrite(tmp_path / "test" / "labels.csv", [["filename", "label"], ["images/00040.png", "eleven"]])
    with pytest.raises(DataError, match="labels that .* lacks: eleven"):
        _sources(tmp_path)


# --------------------------------------------------------------------------- installed, from the command line


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This distribution, installed with pip into a folder of its own (put on PYTHONPATH)."""
    src = tmp_path_factory.mktemp("src") / "mutualkd-csv-images"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        check=True,
    )
    return target


def _mutualkd(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MUTUALKD_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-m", "mutualkd", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_installed_plugin_is_listed(site: Path, tmp_path: Path) -> None:
    proc = _mutualkd(["plugins", "--json"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    row = rows[("dataset", "csv_images")]
    assert row["distribution"] == "mutualkd-csv-images" and row["status"] == "ok", row
    assert row["module"] == "mutualkd_csv_images:CsvImages"


def test_example_recipe_trains_one_epoch_from_the_cli(site: Path, tmp_path: Path) -> None:
    write_digits(tmp_path / "digits-csv", n=240)
    out = tmp_path / "runs"
    sets = [f"data.root={tmp_path / 'digits-csv'}", f"run.out_dir={out}", "run.name=csv", "run.epochs=1",
            "run.progress=false", "data.batch_size=64", "data.image_size=16"]
    proc = _mutualkd(["run", str(RECIPE), *[a for s in sets for a in ("--set", s)]], site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "csv" / "metrics.jsonl").read_text().splitlines()]
    assert records and any("top1" in json.dumps(r) for r in records)
    summary = json.loads((out / "csv" / "summary.json").read_text())
    assert set(summary["top1"]) >= {"peer0", "peer1"}

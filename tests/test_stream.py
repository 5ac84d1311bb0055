"""The stream pipeline: timm readers and transforms, worker processes, sharding, exact resume, bad data.

Image folders and tar shards are written by the tests from real images (scikit-learn's
digits; Fashion-MNIST where Debian's package is installed). The end-to-end cases are real
``mutualkd run`` processes (one, or two under ``torchrun`` with gloo), marked slow.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mutualkd.cli import app
from mutualkd.config import DataConfig, SchedulerConfig
from mutualkd.data import BatchLoader, build_pipeline, choose_pipeline, load_dataset
from mutualkd.data.export import write_tar_shards
from mutualkd.data.sources import SplitSource
from mutualkd.data.stream import ShardSampler, StreamDataset, StreamLoader
from mutualkd.data.transforms import build_mixup
from mutualkd.errors import DataError, RecipeError

#: The factory fixtures of tests/fixtures/ used here (recipe_dict, subprocess_env).
Factory = Callable[..., Any]

REPO = Path(__file__).resolve().parents[1]  # the ImageNet recipes are parametrized over (below)

torch.set_num_threads(1)

ImageFolder = Callable[..., Path]


def _batches(loader: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# --------------------------------------------------------------------------- order and sharding


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stream_order_is_the_device_order_and_shards_are_disjoint(world: int) -> None:
    train, test, info = load_dataset(DataConfig(dataset="digits"))
    seen_train: list[int] = []
    seen_test: list[int] = []
    for rank in range(world):
        for is_train, split, seen in ((True, train, seen_train), (False, test, seen_test)):
            device = BatchLoader(split, info, batch_size=32, device="cpu", train=is_train, augment=False, seed=3,
                                 rank=rank, world_size=world)
            sampler = ShardSampler(len(split), batch_size=32, train=is_train, seed=3, drop_last=True, rank=rank,
                                   world_size=world)
            for epoch in (0, 1):
                device.set_epoch(epoch)
                sampler.epoch = epoch
                assert sampler.order().tolist() == device.indices().tolist()
            assert len(sampler) == len(device)
            seen += sampler.order().tolist()
    assert len(seen_train) == len(set(seen_train))  # disjoint shards
    assert sorted(seen_test) == list(range(len(test)))  # evaluation: every sample once


def _digits_stream(cfg: DataConfig, *, rank: int = 0, world: int = 1) -> Any:
    return build_pipeline(cfg, seed=0, device="cpu", rank=rank, world_size=world)


def test_batches_do_not_depend_on_workers_and_start_batch_resumes_exactly() -> None:
    cfg = DataConfig(dataset="digits", pipeline="stream", batch_size=64, image_size=12, auto_augment="rand-m9-mstd0.5-inc1",
                     reprob=0.5, scale=(0.3, 1.0), num_workers=0)
    inline = _digits_stream(cfg).train
    workers = _digits_stream(cfg.model_copy(update={"num_workers": 2})).train
    inline.set_epoch(1)
    workers.set_epoch(1)
    a, b = _batches(inline), _batches(workers)
    assert len(a) == len(b) == 1347 // 64
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    workers.set_epoch(1)
    workers.start_batch = 5
    tail = _batches(workers)
    assert len(tail) == len(a) - 5 and all(torch.equal(x, y[0]) for (x, _), y in zip(tail, a[5:]))
    workers.set_epoch(2)
    assert not torch.equal(_batches(workers)[0][0], a[0][0])  # another epoch: other crops
    workers.close()


# --------------------------------------------------------------------------- sources: folders, tar shards


def test_image_folder_streams_through_timm_with_train_and_eval_transforms(
    tmp_path: Path, write_image_folder: ImageFolder
) -> None:
    root = write_image_folder(tmp_path / "folder", n_train=60, n_test=20, size=40)
    cfg = DataConfig(dataset="image_folder", root=str(root), pipeline="stream", image_size=32, batch_size=20,
                     eval_batch_size=8, crop_pct=0.8, num_workers=0, color_jitter=0.3)
    pipe = _digits_stream(cfg)
    assert pipe.kind == "stream" and pipe.info.num_classes == 10 and pipe.info.in_chans == 3
    assert pipe.info.image_size == (32, 32) and pipe.info.mean == pytest.approx((0.485, 0.456, 0.406))
    x, y = next(iter(pipe.train))
    assert x.shape == (20, 3, 32, 32) and y.dtype == torch.int64
    # evaluation: resize to 32 / 0.8 = 40, then the centre 32x32 crop, deterministic
    ev = str(pipe.test.dataset.transform)
    assert "Resize(size=40" in ev and "CenterCrop(size=(32, 32))" in ev
    assert len(pipe.test) == 3 and sum(int(b[1].numel()) for b in pipe.test) == 20
    assert torch.equal(torch.cat([b[0] for b in pipe.test]), torch.cat([b[0] for b in pipe.test]))


def test_tar_shards_hold_the_same_samples_as_the_folder(tmp_path: Path, write_image_folder: ImageFolder) -> None:
    folder = write_image_folder(tmp_path / "folder", n_train=40, n_test=12, size=16)
    shards = write_tar_shards(folder, tmp_path / "shards", shards=3)
    base = dict(pipeline="stream", image_size=16, batch_size=8, eval_batch_size=64, num_workers=0, augment=False)
    a = _digits_stream(DataConfig(dataset="image_folder", root=str(folder), **base))
    b = _digits_stream(DataConfig(dataset="image_tar", root=str(shards), **base))
    assert choose_pipeline(DataConfig(dataset="image_tar", root=str(shards)))[0] == "stream"
    xa, ya = next(iter(a.test))
    xb, yb = next(iter(b.test))
    assert xa.shape == xb.shape == (12, 3, 16, 16)
    assert sorted(ya.tolist()) == sorted(yb.tolist())
    key = lambda x, y: sorted((int(l), round(float(im.sum()), 3)) for im, l in zip(x, y))  # noqa: E731
    assert key(xa, ya) == key(xb, yb)  # the same images, decoded alike
    with pytest.raises(DataError, match="stream pipeline only"):
        load_dataset(DataConfig(dataset="image_tar", root=str(shards)))


def test_auto_keeps_what_fits_on_the_device_and_streams_the_rest(tmp_path: Path, write_image_folder: ImageFolder) -> None:
    root = write_image_folder(tmp_path / "folder", n_train=30, n_test=10, size=16)
    assert choose_pipeline(DataConfig(dataset="digits"))[0] == "device"
    kind, why = choose_pipeline(DataConfig(dataset="image_folder", root=str(root), image_size=16))
    assert kind == "device" and "40 images" in why and "within" in why
    kind, why = choose_pipeline(DataConfig(dataset="image_folder", root=str(root), image_size=16, memory_budget_gb=1e-6))
    assert kind == "stream" and "over data.memory_budget_gb" in why
    assert choose_pipeline(DataConfig(dataset="image_folder", root=str(root)))[0] == "device"  # asks for image_size
    assert choose_pipeline(DataConfig(dataset="digits", pipeline="stream")) == ("stream", 'data.pipeline = "stream"')


def test_config_from_takes_size_and_statistics_from_a_pretrained_config(tmp_path: Path,
                                                                       write_image_folder: ImageFolder) -> None:
    root = write_image_folder(tmp_path / "folder", n_train=20, n_test=10, size=16)
    cfg = DataConfig(dataset="image_folder", root=str(root), pipeline="stream", config_from="resnet34.a1_in1k",
                     num_workers=0, batch_size=4)
    pipe = build_pipeline(cfg, seed=0, device="cpu", peers={"teacher": "resnet34"})
    assert pipe.input is not None
    assert pipe.input.input_size == (3, 224, 224) and pipe.input.crop_pct == 0.95
    assert pipe.input.interpolation == "bicubic"
    with pytest.raises(DataError, match="config_from") as e:
        build_pipeline(cfg.model_copy(update={"config_from": "no_such_net"}), seed=0, device="cpu")
    assert e.value.field == "data.config_from"


# --------------------------------------------------------------------------- mixup, soft targets, splits


def test_mixup_gives_soft_targets_seeded_per_batch_and_every_builtin_ce_takes_them() -> None:
    mix = build_mixup(DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 10, seed=0)
    assert mix is not None
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    xa, ta = mix(x.clone(), y, epoch=1, batch=2, rank=0)  # timm mixes in place
    xb, tb = mix(x.clone(), y, epoch=1, batch=2, rank=0)
    xc, _ = mix(x.clone(), y, epoch=1, batch=3, rank=0)
    assert torch.equal(xa, xb) and torch.equal(ta, tb) and not torch.equal(xa, xc)
    assert ta.shape == (8, 10) and torch.allclose(ta.sum(1), torch.ones(8))
    smooth = build_mixup(DataConfig(label_smoothing=0.1), 10, seed=0)
    assert smooth is not None
    xs, ts = smooth(x.clone(), y, epoch=0, batch=0, rank=0)
    assert torch.equal(xs, x) and float(ts.max()) == pytest.approx(0.91)
    assert build_mixup(DataConfig(), 10, seed=0) is None

    from mutualkd_builtins.strategies.kl_dml import kl_dml_terms

    logits = torch.randn(8, 10)
    soft = kl_dml_terms(logits, [torch.randn(8, 10)], ta, temperature=1.0, weight=1.0, reduction="mean")["ce"]
    want = -(ta * F.log_softmax(logits, 1)).sum(1).mean()
    assert float(soft) == pytest.approx(float(want), rel=1e-5)


def test_val_fraction_is_held_out_of_train_alike_in_both_pipelines() -> None:
    cfg = DataConfig(dataset="digits", val_fraction=0.2, batch_size=16, num_workers=0)
    dev = build_pipeline(cfg.model_copy(update={"pipeline": "device"}), seed=0, device="cpu")
    stream = build_pipeline(cfg.model_copy(update={"pipeline": "stream"}), seed=0, device="cpu")
    assert dev.val is not None and stream.val is not None
    assert dev.val.num_samples == stream.val.num_samples == round(0.2 * 1347)
    assert dev.train.num_samples == stream.train.num_samples
    assert set(stream.val.dataset.indices.tolist()).isdisjoint(stream.train.dataset.indices.tolist())
    labels = torch.cat([b[1] for b in dev.val])
    assert torch.equal(labels, torch.cat([b[1] for b in stream.val]))
    assert torch.bincount(labels, minlength=10).min() >= 25  # stratified: every class keeps its share


# --------------------------------------------------------------------------- bad data


class _Dying:
    """A source whose sample 5 kills the worker process that opens it (like the OOM killer)."""

    def __init__(self, inner: SplitSource) -> None:
        self.inner, self.labels, self.num_classes, self.in_chans = inner, inner.labels, inner.num_classes, inner.in_chans

    def __len__(self) -> int:
        return len(self.inner)

    def open(self, i: int) -> Any:
        if i == 5 and os.environ.get("MKD_IN_TEST_PARENT") != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.open(i)

    def name(self, i: int) -> str:
        return self.inner.name(i)


def test_a_dead_worker_is_one_data_error() -> None:
    from torchvision.transforms import ToTensor

    train, _, info = load_dataset(DataConfig(dataset="digits"))
    os.environ["MKD_IN_TEST_PARENT"] = str(os.getpid())
    try:
        ds = StreamDataset(_Dying(SplitSource(train, 10, "digits train")), np.arange(64), ToTensor(), seed=0, train=False)
        loader = StreamLoader(ds, batch_size=8, device="cpu", train=False, seed=0, num_workers=1)
        with pytest.raises(DataError, match="worker process died") as e:
            _batches(loader)
    finally:
        del os.environ["MKD_IN_TEST_PARENT"]
    assert e.value.field == "data.num_workers" and "out of memory" in (e.value.hint or "")


def _corrupt_one(root: Path) -> Path:
    bad = sorted((root / "train").rglob("*.jpg"))[25]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: the header reads, the pixels do not
    return bad


def test_an_unreadable_image_stops_naming_the_file_or_is_skipped_and_counted(
    tmp_path: Path, write_image_folder: ImageFolder
) -> None:
    root = write_image_folder(tmp_path / "folder", n_train=48, n_test=8, size=16)
    bad = _corrupt_one(root)
    cfg = DataConfig(dataset="image_folder", root=str(root), pipeline="stream", image_size=16, batch_size=8,
                     num_workers=1)
    with pytest.raises(DataError) as e:
        _batches(build_pipeline(cfg, seed=0, device="cpu").train)
    assert str(bad) in e.value.message and e.value.field == "data.skip_corrupt"
    assert "skip_corrupt = true" in (e.value.hint or "")
    loader = build_pipeline(cfg.model_copy(update={"skip_corrupt": True}), seed=0, device="cpu").train
    got = _batches(loader)
    assert len(got) == 6 and sum(int(y.numel()) for _, y in got) == 47 and loader.skipped == 1


# --------------------------------------------------------------------------- schedules, clipping, stages


def test_scheduler_steps_per_iteration_or_per_epoch() -> None:
    from mutualkd.optim import build_scheduler

    def lrs(interval: str) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = build_scheduler(opt, SchedulerConfig(name="cosine", warmup_epochs=1, interval=interval),  # type: ignore[arg-type]
                                total_epochs=3, steps_per_epoch=4)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    step, epoch = lrs("step"), lrs("epoch")
    assert step[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75]) and len(set(step)) == 12
    assert epoch[:4] == [0.5] * 4 and epoch[4:8] == [1.0] * 4 and len(set(epoch[8:])) == 1


def test_gradient_clipping_goes_through_precision() -> None:
    from mutualkd.engine.precision import Precision

    p = torch.nn.Parameter(torch.ones(10))
    opt = torch.optim.SGD([p], lr=0.0)
    Precision("no", torch.device("cpu")).update((p * 100).sum(), {"u": opt}, clip={"u": (1.0, "norm")})
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    Precision("no", torch.device("cpu")).update((p * 100).sum(), {"u": opt})
    assert float(p.grad.norm()) == pytest.approx(100 * 10**0.5, rel=1e-5)


def test_feature_stage_gives_a_timm_resnet_a_map_at_32px(tmp_path: Path, recipe_dict: Factory) -> None:
    from mutualkd.config import parse_recipe
    from mutualkd.engine.build import check_recipe

    d = recipe_dict(tmp_path, strategy="ie_dml", peers=["resnet18", "resnet18"], data={"image_size": 32})
    for peer in d["peers"]:
        peer["feature_stage"] = -2
    check_recipe(parse_recipe(d))  # without it: a 1x1 map, which the autoencoder refuses
    d["peers"][0] = {"model": "cifar_resnet20", "feature_stage": 1}
    with pytest.raises(RecipeError, match="forward_intermediates") as e:
        check_recipe(parse_recipe(d))
    assert e.value.field == "peers[0].feature_stage"


# --------------------------------------------------------------------------- recipes/imagenet


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "imagenet").glob("*.toml")), ids=lambda p: p.name)
def test_imagenet_recipes_validate_naming_the_missing_data(recipe: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(recipe), "--set", f"data.root={json.dumps(str(tmp_path / 'in1k'))}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "data.root" in text and "in1k" in text and "train/<class>/<image>" in text


def test_imagenet_recipes_are_valid_apart_from_the_data(tmp_path: Path) -> None:
    assert "ie_dml_resnet18_resnet18.toml" in [p.name for p in (REPO / "recipes" / "imagenet").glob("*.toml")]
    for recipe in (REPO / "recipes" / "imagenet").glob("*.toml"):
        result = CliRunner().invoke(app, ["validate", str(recipe), "--no-data"])
        assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- end to end: real processes

RECIPE = """\
[run]
name = "stream"
seed = 0
epochs = 2
out_dir = {out}
log_every = 1
checkpoint_every = 3
keep_checkpoints = 10
deterministic = true
device = "cpu"
progress = false

[data]
dataset = "image_folder"
root = {root}
pipeline = "stream"
image_size = 32
batch_size = {batch}
eval_batch_size = 32
num_workers = {workers}
scale = [0.35, 1.0]
auto_augment = "rand-m9-mstd0.5-inc1"
mixup = 0.2
cutmix = 1.0
label_smoothing = 0.1

[[peers]]
model = "resnet18"
feature_stage = -2

[[peers]]
model = "resnet18"
feature_stage = -2

[optimizer]
name = "sgd"
lr = 0.05

[scheduler]
name = "cosine"
warmup_epochs = 1

[strategy]
name = "ie_dml"
"""
TIMING = frozenset({"images_per_s", "train_seconds", "data_wait_share"})


def _command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mutualkd", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "mutualkd", *args]


def _kill_tree(proc: subprocess.Popen[bytes], descendants: Callable[[int], list[int]]) -> None:
    """SIGKILL the launcher, every rank and every data-loading worker at once (like a lost node).

    ``descendants`` is the process-tree walk of the launch kit (``launch_kit.descendants``)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(60)


def _start(recipe: Path, log: Path, nproc: int, *extra: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(_command(nproc, "run", str(recipe), *extra), stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], log: Path, descendants: Callable[[int], list[int]], timeout: float = 240) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc, descendants)
        pytest.fail(f"the run did not end within {timeout} s\n{log.read_text()[-3000:]}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ie_dml_resnet18_streams_a_jpeg_folder_and_resumes_exactly_after_sigkill(
    nproc: int, tmp_path: Path, write_image_folder: ImageFolder, subprocess_env: Factory, launch_kit: Any
) -> None:
    """Two timm resnet18 peers, IE-DML, RandomResizedCrop + RandAugment + mixup/cutmix, 2 epochs of
    4 (one process) or 2 (two) steps; killed (SIGKILL: launcher, ranks, workers) right after the
    checkpoint of step 3, in the middle of epoch 2,
    resumed: metrics.jsonl equals the uninterrupted run's line for line, timings aside."""
    root = write_image_folder(tmp_path / "folder", n_train=64, n_test=16, size=36)
    workers = 2 if nproc == 1 else 1

    def recipe(name: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        path = out / "recipe.toml"
        path.write_text(RECIPE.format(out=json.dumps(str(out / "runs")), root=json.dumps(str(root)), batch=16,
                                      workers=workers))
        return path

    ref_recipe, kill_recipe = recipe("reference"), recipe("killed")
    reference = _start(ref_recipe, tmp_path / "reference.log", nproc, env=subprocess_env())
    killed_dir = kill_recipe.parent / "runs" / "stream"
    killed = _start(kill_recipe, tmp_path / "killed.log", nproc, env=subprocess_env())
    marker = killed_dir / "checkpoints" / "step-00000003" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if killed.poll() is not None or time.monotonic() > deadline:
            _kill_tree(killed, launch_kit.descendants)
            pytest.fail(f"no checkpoint at step 3\n{(tmp_path / 'killed.log').read_text()[-3000:]}")
        time.sleep(0.01)
    _kill_tree(killed, launch_kit.descendants)
    assert not (killed_dir / "summary.json").exists()
    ref_text = _finish(reference, tmp_path / "reference.log", launch_kit.descendants)
    assert "data: stream pipeline" in ref_text and f"global batch {16 * nproc}" in ref_text

    resumed = _start(kill_recipe, tmp_path / "resumed.log", nproc, "--resume", str(killed_dir), env=subprocess_env())
    _finish(resumed, tmp_path / "resumed.log", launch_kit.descendants)
    ref_dir = ref_recipe.parent / "runs" / "stream"
    got, want = _metrics(killed_dir), _metrics(ref_dir)
    assert len(want) == sum(1 for r in want if r["kind"] == "step") + 2
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"metrics.jsonl line {i + 1} differs:\n{a}\n{b}"
    assert len(got) == len(want)
    summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary == json.loads((killed_dir / "summary.json").read_text())
    assert set(summary["top5"]) == {"peer0", "peer1", "ensemble"}
    epoch = [r for r in want if r["kind"] == "epoch"][-1]
    assert set(epoch["top1"]) == set(epoch["top5"]) == {"peer0", "peer1", "ensemble"}

"""Step-time benchmark: the mutualkd engine against a hand-written and a naive loop.

For each case (KL-DML alternating with N = 2, 3, 4 peers, KL-DML simultaneous N = 2,
IE-DML alternating N = 2) three implementations train the same peers on the same
batches, in one process:

* ``engine``: :class:`mutualkd.engine.Trainer` built from a recipe dict, driven through
  its public ``fit()``: one epoch of ``--warmup`` + ``--steps`` x ``--repeats`` batches
  (``run.max_steps`` ends it). An instance-level wrapper of ``trainer._train_batch``
  cuts it into windows of ``--steps`` batches and runs the other implementations
  between them. An engine window's time covers everything its loop does per batch
  (fetch, strategy, backward, optimizer and scheduler steps, loss checks, step logging);
  the end-of-epoch evaluation and checkpoint come after the last window. Its data wait
  is the engine's own, from the epoch's record in ``metrics.jsonl``.
* ``hand``: a loop written for the case with the minimal passes (KL-DML alternating:
  2N-1 forwards, simultaneous: N, IE-DML N=2: 3), see :func:`hand_kl_alternating`,
  :func:`hand_kl_simultaneous`, :func:`hand_ie_dml_pair`.
* ``naive``: the style of the published DML code: every update re-forwards every peer
  with gradients and nothing is detached, so each backward runs through all peers
  (KL-DML alternating: N^2 forwards), see the ``naive_*`` functions.

All three start from identical weights (the hand and naive loops get deep copies of the
engine's modules before any step), use the same optimizer settings, and read the same
sequence of batches: a :class:`mutualkd.data.BatchLoader` with the run's seed, whose
order and augmentation are a pure function of (seed, epoch, batch).

Rounds: the engine's window, then the same batches through each other implementation
(their order rotates each round). The first round is the warm-up. Per implementation
the median window is reported; the ratios the targets compare (engine/hand,
engine/naive) are the median of the per-round ratios. A round's windows ran within a
second or so of each other, so a slow phase of a shared machine hits them alike: with
one-batch windows the ratio is resolved to about a percent where ratios of separately
timed windows scatter by ten.

Measured per case and implementation: images/s, ms per batch, forward passes per batch
(a forward pre-hook on each peer module, counting calls in training mode), the share of
the time spent waiting for the next batch, and peak memory, in a separate window per
implementation after the timing (CUDA: ``torch.cuda.max_memory_allocated`` above the
allocation at the window's start; CPU: the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after ``malloc_trim``) above its resident set at the
window's start, i.e. the window's working-set growth, which includes allocator slack).

    python benchmarks/bench_engine.py --quick                   # < 5 min on a quiet 2-core CPU
    python benchmarks/bench_engine.py --json-out b.json --md-out b.md
    python benchmarks/bench_engine.py --device cuda --mixed-precision bf16 --channels-last

See benchmarks/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import contextlib
import copy
import ctypes
import dataclasses
from dataclasses import dataclass, field
import gc
import json
import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.config import parse_recipe
from mutualkd.data import BatchLoader, Split
from mutualkd.engine import Trainer
from mutualkd.optim import build_optimizer
from mutualkd_builtins.factor import InheritExploreEncoders, Paraphraser
from mutualkd_builtins.losses import kl_to_peers, soft_kl
from mutualkd_builtins.metrics import l1_distance

__all__ = [
    "Case",
    "CASES",
    "Settings",
    "Peers",
    "build_trainer",
    "clone_modules",
    "hand_kl_alternating",
    "hand_kl_simultaneous",
    "hand_ie_dml_pair",
    "naive_kl_alternating",
    "naive_kl_simultaneous",
    "naive_ie_dml_pair",
    "min_forwards",
    "naive_forwards",
    "ForwardCounter",
    "run_case",
    "main",
]

IMPLS = ("engine", "hand", "naive")
MODELS = ("cifar_resnet20", "cifar_wrn_16_1")
#: IE-DML hyper-parameters shared by the engine's recipe and the hand-written loops.
IE_LAMBDA = 50.0


# ============================================================================ cases and settings


@dataclass(frozen=True)
class Case:
    """One benchmark case: a strategy, its schedule mode and the number of peers."""

    name: str
    strategy: str  # "kl_dml" or "ie_dml"
    mode: str  # "alternating" or "simultaneous"
    n: int


CASES: tuple[Case, ...] = (
    Case("kl_dml_alt_n2", "kl_dml", "alternating", 2),
    Case("kl_dml_alt_n3", "kl_dml", "alternating", 3),
    Case("kl_dml_alt_n4", "kl_dml", "alternating", 4),
    Case("kl_dml_sim_n2", "kl_dml", "simultaneous", 2),
    Case("ie_dml_alt_n2", "ie_dml", "alternating", 2),
)


@dataclass
class Settings:
    """Everything a run of the benchmark depends on (recorded in the JSON output)."""

    device: str = "cpu"
    batch_size: int = 64
    warmup: int = 2  # batches of epoch 0, not timed
    steps: int = 1  # batches per implementation and round
    repeats: int = 18  # rounds (timed windows per implementation)
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    dataset: str = "digits"  # digits (resized), fake-cifar10, fake-cifar100
    image_size: int = 32
    models: tuple[str, ...] = MODELS
    impls: tuple[str, ...] = IMPLS
    seed: int = 0
    threads: int | None = None
    fake_train: int = 2000  # images of the fake CIFAR train split
    fake_test: int = 200
    eval_test: bool = False  # time one evaluation over the whole test split (engine)
    stat: str = "median"  # statistic over the timed windows: median, or min (less sensitive to load)
    clock: str = "wall"  # time behind images/s and the ratios: wall, or process CPU time
    work_dir: str | None = None


def min_forwards(case: Case) -> int:
    """The fewest forward passes per batch a faithful schedule needs."""
    if case.strategy == "ie_dml":
        return 3 if case.n == 2 else 2 * case.n - 1  # N = 2: the four-step schedule
    return 2 * case.n - 1 if case.mode == "alternating" else case.n


def naive_forwards(case: Case) -> int:
    """Forward passes per batch of the naive loops (every update re-forwards every peer)."""
    if case.strategy == "ie_dml":
        return 4 * case.n  # four steps, each re-forwarding both peers
    return case.n * case.n if case.mode == "alternating" else case.n


def peer_models(case: Case, models: Sequence[str]) -> list[str]:
    return [models[i % len(models)] for i in range(case.n)]


# ============================================================================ engine side


def recipe_dict(case: Case, s: Settings, out_dir: Path, data_root: str | None) -> dict[str, Any]:
    """The recipe the engine runs for ``case`` (also the source of the loops' settings)."""
    if s.dataset == "digits":
        data: dict[str, Any] = {"dataset": "digits", "image_size": s.image_size}
    else:
        data = {"dataset": s.dataset.removeprefix("fake-"), "root": data_root}
    data.update(batch_size=s.batch_size, eval_batch_size=512, augment=True, drop_last=True)
    if not s.eval_test:
        data["test_subset"] = 20  # evaluation runs after each window, outside the timing
    strategy: dict[str, Any] = {"name": case.strategy}
    if case.strategy == "ie_dml":
        strategy.update(inh_metric="l1", exp_metric="l1", lambda_inh=IE_LAMBDA, lambda_exp=IE_LAMBDA)
    return {
        "run": {
            "name": case.name,
            "seed": s.seed,
            "epochs": 100_000,  # each window is a new epoch; max_steps ends it
            "out_dir": str(out_dir),
            "progress": False,
            "device": "cpu" if s.device == "cpu" else "auto",
            "mixed_precision": s.mixed_precision,
            "channels_last": s.channels_last,
            "compile": s.compile,
            "max_steps": max(s.warmup, 1),
            "keep_checkpoints": 2,
        },
        "data": data,
        "peers": [{"model": m} for m in peer_models(case, s.models)],
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"name": "constant"},
        "strategy": strategy,
        "schedule": {"mode": case.mode},
    }


def build_trainer(case: Case, s: Settings, out_dir: Path, data_root: str | None = None) -> Trainer:
    return Trainer(parse_recipe(recipe_dict(case, s, out_dir, data_root), file=f"<bench {case.name}>"),
                   recipe_file=f"<bench {case.name}>")


def _raw(m: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (accelerate leaves nothing else on one device)."""
    return getattr(m, "_orig_mod", m)


@dataclass
class Peers:
    """The modules and optimizers a hand-written or naive loop trains.

    ``peers[i]`` is a :class:`mutualkd.peers.PeerModule` (returns ``(features, logits)``);
    IE-DML adds ``aes[i]`` (peer i's factor autoencoder) and ``encs[(s, t)]`` (student s's
    inheritance/exploration encoders towards teacher t). ``opts[i]`` updates peer i and
    its encoders, ``ae_opts[i]`` peer i's autoencoder, as in the engine's units.
    """

    peers: list[nn.Module]
    opts: list[torch.optim.Optimizer]
    aes: list[Paraphraser] = field(default_factory=list)
    encs: dict[tuple[int, int], InheritExploreEncoders] = field(default_factory=dict)
    ae_opts: list[torch.optim.Optimizer] = field(default_factory=list)

    def all_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.opts + self.ae_opts

    def train(self) -> None:
        for m in [*self.peers, *self.aes, *self.encs.values()]:
            m.train()


def clone_modules(trainer: Trainer, *, compile: bool = False) -> Peers:
    """Deep copies of the trainer's peers (and IE-DML modules) with fresh optimizers.

    Copies are taken before any training step, so a loop starts from the engine's
    initial weights. Optimizers use the recipe's settings for the same parameter groups
    as the engine's units (peer backbone + its encoders; each autoencoder alone).
    """
    recipe = trainer.recipe
    names = trainer.peer_names
    peers = [copy.deepcopy(_raw(trainer.accelerator.unwrap_model(m))) for m in trainer.peer_modules]
    aes: list[Paraphraser] = []
    encs: dict[tuple[int, int], InheritExploreEncoders] = {}
    for i, name in enumerate(names):
        if f"{name}.ae" in trainer.aux:
            aes.append(copy.deepcopy(trainer.accelerator.unwrap_model(trainer.aux[f"{name}.ae"])))
        for j, other in enumerate(names):
            key = f"{name}.ie.{other}"
            if key in trainer.aux:
                encs[(i, j)] = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.aux[key]))
    opts = []
    for i in range(len(peers)):
        params = list(peers[i].parameters()) + [p for (s, _), e in encs.items() if s == i for p in e.parameters()]
        opts.append(build_optimizer(params, recipe.peer_optimizer(i)))
    ae_opts = [build_optimizer(ae.parameters(), recipe.peer_optimizer(i)) for i, ae in enumerate(aes)]
    if compile:
        peers = [torch.compile(p) for p in peers]  # type: ignore[misc]
    out = Peers(peers, opts, aes, encs, ae_opts)
    out.train()
    return out


# ============================================================================ the loops

AmpFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def _no_amp() -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _update(loss: Tensor, optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None,
            zero: Sequence[torch.optim.Optimizer] | None = None) -> None:
    """zero_grad (of ``zero``, default ``optimizers``), backward, step ``optimizers``."""
    for o in (optimizers if zero is None else zero):
        o.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        for o in optimizers:
            scaler.step(o)
    else:
        loss.backward()
        for o in optimizers:
            o.step()


def _kl_dml_loss(logits: Tensor, others: Sequence[Tensor], y: Tensor) -> Tensor:
    # kl_to_peers detaches the targets (w = 1, T = 1, mean over the others: the recipe's defaults)
    return F.cross_entropy(logits.float(), y) + kl_to_peers(logits, others, 1.0, "mean")


def hand_kl_alternating(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                        scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML, alternating, minimal passes: 2N - 1 forwards, N backwards through one peer each.

    All peers are run once with gradients. For k in order, peer k's loss takes the other
    peers' current logits as detached targets; after peer k stepped, it is re-run without
    gradients so that later peers see its updated predictions (the last peer is not).
    """
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
    for k in range(n):
        with amp():
            loss = _kl_dml_loss(logits[k], [logits[j] for j in range(n) if j != k], y)
        _update(loss, [m.opts[k]], scaler)
        if k < n - 1:
            with torch.no_grad(), amp():
                logits[k] = m.peers[k](x)[1]
    if scaler is not None:
        scaler.update()


def hand_kl_simultaneous(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML, simultaneous: N forwards, one backward of the summed losses, every peer steps."""
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
        loss = torch.stack([_kl_dml_loss(logits[k], [logits[j] for j in range(n) if j != k], y)
                            for k in range(n)]).sum()
    _update(loss, m.opts, scaler)
    if scaler is not None:
        scaler.update()


def _ie_student_loss(logits: Tensor, f_student: Tensor, enc: InheritExploreEncoders, factor: Tensor,
                     y: Tensor) -> Tensor:
    if f_student.shape[-2:] != factor.shape[-2:]:
        f_student = F.adaptive_avg_pool2d(f_student, factor.shape[-2:])
    f_inh, f_exp = enc(f_student)
    target = factor.float()
    return (F.cross_entropy(logits.float(), y) + IE_LAMBDA * l1_distance(f_inh.float(), target)
            - IE_LAMBDA * l1_distance(f_exp.float(), target))


def hand_ie_dml_pair(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                     scaler: torch.amp.GradScaler | None = None) -> None:
    """IE-DML, two peers, the four steps with 3 forward passes.

    1. autoencoder 1 on net 1's features (net 1 run with gradients: its graph is reused in 4);
    2. net 2 (run with gradients) + its encoders against Enc_1(f_1) (no gradient);
    3. net 2 re-run without gradients (it changed), autoencoder 2 on its features;
    4. net 1 + its encoders against Enc_2(f_2), through the graph kept from step 1.
    Teacher factors use the encoder only (the decoder output is not needed).
    """
    p0, p1 = m.peers
    with amp():
        f0, z0 = p0(x)
        fd = f0.detach()
        _, rec = m.aes[0](fd)
        loss = m.aes[0].reconstruction_loss(fd, rec)
    _update(loss, [m.ae_opts[0]], scaler)
    with amp():
        f1, z1 = p1(x)
        with torch.no_grad():
            t0 = m.aes[0].encode(fd)
        loss = _ie_student_loss(z1, f1, m.encs[(1, 0)], t0, y)
    _update(loss, [m.opts[1]], scaler)
    with amp():
        with torch.no_grad():
            f1n, _ = p1(x)
        _, rec = m.aes[1](f1n)
        loss = m.aes[1].reconstruction_loss(f1n, rec)
    _update(loss, [m.ae_opts[1]], scaler)
    with amp():
        with torch.no_grad():
            t1 = m.aes[1].encode(f1n)
        loss = _ie_student_loss(z0, f0, m.encs[(0, 1)], t1, y)
    _update(loss, [m.opts[0]], scaler)
    if scaler is not None:
        scaler.update()


def _naive_kl_loss(logits: Sequence[Tensor], k: int, y: Tensor) -> Tensor:
    # The other peers' logits are NOT detached: the backward runs through every peer.
    others = [soft_kl(logits[k], logits[j]) for j in range(len(logits)) if j != k]
    return F.cross_entropy(logits[k].float(), y) + torch.stack(others).mean()


def naive_kl_alternating(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML alternating as in the published DML code: N^2 forwards, N backwards through all peers.

    For every peer's update all peers are re-run with gradients, the targets are not
    detached, every optimizer is zeroed and only peer k's optimizer steps.
    """
    n = len(m.peers)
    for k in range(n):
        with amp():
            logits = [p(x)[1] for p in m.peers]
            loss = _naive_kl_loss(logits, k, y)
        _update(loss, [m.opts[k]], scaler, zero=m.opts)
    if scaler is not None:
        scaler.update()


def naive_kl_simultaneous(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                          scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML simultaneous, naive: N forwards, then one backward per peer loss through all peers.

    Targets are not detached, so each loss is backpropagated on its own (keeping the
    graph) and only peer k's gradients of loss k are kept; all peers step at the end.
    """
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
    kept: list[list[Tensor | None]] = []
    for k in range(n):
        with amp():
            loss = _naive_kl_loss(logits, k, y)
        for o in m.opts:
            o.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=k < n - 1)
        kept.append([None if p.grad is None else p.grad.clone() for g in m.opts[k].param_groups for p in g["params"]])
    for k, o in enumerate(m.opts):
        params = [p for g in o.param_groups for p in g["params"]]
        for p, gr in zip(params, kept[k]):
            p.grad = gr
        if scaler is not None:
            scaler.step(o)
        else:
            o.step()
    if scaler is not None:
        scaler.update()


def naive_ie_dml_pair(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = _no_amp,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """IE-DML N=2 in the naive style: each of the four steps re-runs both peers with gradients.

    Nothing is detached (features into the autoencoders, teacher factors), every optimizer
    is zeroed before each backward, only the step's unit steps: 8 forwards per batch.
    """
    everyone = m.all_optimizers()
    plan = [("ae", 0), ("student", 1), ("ae", 1), ("student", 0)]
    for kind, i in plan:
        with amp():
            outs = [p(x) for p in m.peers]
            if kind == "ae":
                f = outs[i][0]
                _, rec = m.aes[i](f)
                loss = m.aes[i].reconstruction_loss(f, rec)
                unit = m.ae_opts[i]
            else:
                t = 1 - i
                factor = m.aes[t].encode(outs[t][0])
                loss = _ie_student_loss(outs[i][1], outs[i][0], m.encs[(i, t)], factor, y)
                unit = m.opts[i]
        _update(loss, [unit], scaler, zero=everyone)
    if scaler is not None:
        scaler.update()


LoopFn = Callable[..., None]


def loop_for(case: Case, impl: str) -> LoopFn:
    """The hand-written or naive loop of ``case``."""
    if case.strategy == "ie_dml":
        if case.n != 2:
            raise ValueError("the hand-written IE-DML loops cover N = 2 (the four-step schedule)")
        return hand_ie_dml_pair if impl == "hand" else naive_ie_dml_pair
    if case.mode == "alternating":
        return hand_kl_alternating if impl == "hand" else naive_kl_alternating
    return hand_kl_simultaneous if impl == "hand" else naive_kl_simultaneous


# ============================================================================ measuring


class ForwardCounter:
    """Counts forward calls of the given modules made in training mode (evaluation is not counted)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.count = 0
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.count += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """Peak memory of a window: CUDA allocator peak, or the process's peak RSS (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type != "cuda" and self._can_reset_hwm()

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    @property
    def what(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at the window's start"
        if self.cpu_ok:
            return "peak RSS (VmHWM, reset via /proc/self/clear_refs after malloc_trim) above RSS at the window's start"
        return "not measured (no /proc/self/clear_refs)"

    def start(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not self.cpu_ok:
            return 0
        _malloc_trim()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return (_status_kb("VmRSS") or 0) * 1024

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if not self.cpu_ok:
            return None
        return (_status_kb("VmHWM") or 0) * 1024


@dataclass
class Window:
    """Consecutive batches of one implementation, timed from the first fetch to the end of the last step."""

    seconds: float
    cpu_seconds: float  # process CPU time over the same span
    batches: int
    images: int
    data_wait: float = 0.0  # time spent fetching batches (loops; the engine's comes from its own record)


class _EngineProbe:
    """Instance-level wrapper of ``trainer._train_batch``: instrumentation only.

    The engine runs in one ``fit()`` whose batches are cut into windows of the planned
    sizes. After a window's last batch step the probe waits for the device, records the
    window, and calls ``after(i)``: the other implementations run their windows there,
    back to back with the engine's. The engine's next window starts when that call
    returns, so its time covers everything the engine's loop does per batch: fetching
    the batch, the strategy, backward and optimizer steps, loss checks, logging.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.inner = trainer._train_batch
        trainer._train_batch = self  # type: ignore[method-assign]
        self.sizes: list[int] = []
        self.after: Callable[[int], None] = lambda i: None
        self.windows: list[Window] = []
        self._in_window = 0
        self._t0 = self._c0 = 0.0

    def plan(self, sizes: Sequence[int], after: Callable[[int], None]) -> None:
        self.sizes, self.after, self.windows, self._in_window = list(sizes), after, [], 0
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        i = len(self.windows)
        if i >= len(self.sizes):
            return out
        self._in_window += 1
        if self._in_window == self.sizes[i]:
            _sync(self.trainer.device)
            n = self.sizes[i]
            self.windows.append(Window(time.perf_counter() - self._t0, time.process_time() - self._c0, n,
                                       n * self.trainer.recipe.data.batch_size))
            self._in_window = 0
            self.after(i)
            _sync(self.trainer.device)
            self._t0, self._c0 = time.perf_counter(), time.process_time()
        return out


class EngineRunner:
    """Drives a Trainer through ``fit()``: one epoch cut into windows (see :class:`_EngineProbe`)."""

    name = "engine"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.probe = _EngineProbe(trainer)
        self.counter = ForwardCounter(trainer.peer_modules)
        self.metrics = trainer.run_dir / "metrics.jsonl"

    def run(self, sizes: Sequence[int], after: Callable[[int], None]) -> tuple[list[Window], float]:
        """Train ``sum(sizes)`` batches in one new epoch; returns the windows and the epoch's data wait (s)."""
        t = self.trainer
        if t.pos.batch != 0:
            raise RuntimeError("the engine must start a window plan at an epoch boundary")
        if sum(sizes) > len(t.train_loader):
            raise SystemExit(f"--warmup + --steps x --repeats = {sum(sizes)} batches do not fit in one epoch"
                             f" ({len(t.train_loader)} batches of this data set and batch size)")
        self.probe.plan(sizes, after)
        t.recipe.run.max_steps = t.pos.global_step + sum(sizes)
        t.fit()  # max_steps ends the epoch after the plan; its evaluation and checkpoint are not timed
        rec = [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        epoch = [r for r in rec if r.get("kind") == "epoch"][-1]
        return self.probe.windows, float(epoch["data_wait_share"]) * float(epoch["train_seconds"])


class LoopRunner:
    """Runs a hand-written or naive loop over the same sequence of batches the engine sees."""

    def __init__(self, name: str, fn: LoopFn, modules: Peers, loader: BatchLoader, device: torch.device,
                 amp: AmpFactory, scaler: torch.amp.GradScaler | None) -> None:
        self.name = name
        self.fn = fn
        self.m = modules
        self.loader = loader
        self.device = device
        self.amp = amp
        self.scaler = scaler
        self.counter = ForwardCounter(modules.peers)
        self.epoch = 0
        self._batches: Any = None

    def _next(self) -> tuple[Tensor, Tensor]:
        while True:
            if self._batches is None:
                self.loader.set_epoch(self.epoch)
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None
                self.epoch += 1

    def new_epoch(self) -> None:
        """Continue with the next epoch's batches (as the engine does after a ``fit()``)."""
        if self._batches is not None:
            self._batches = None
            self.epoch += 1

    def window(self, n: int) -> Window:
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        wait = 0.0
        images = 0
        for _ in range(n):
            tw = time.perf_counter()
            x, y = self._next()
            wait += time.perf_counter() - tw
            self.fn(self.m, x, y, amp=self.amp, scaler=self.scaler)
            images += int(x.shape[0])
        _sync(self.device)
        return Window(time.perf_counter() - t0, time.process_time() - c0, n, images, wait)


def _amp_for(trainer: Trainer, s: Settings) -> tuple[AmpFactory, torch.amp.GradScaler | None, str]:
    """The loops' autocast and scaler, matching what the engine's Accelerator really does."""
    acc = trainer.accelerator
    dev = trainer.device.type
    if s.mixed_precision == "no" or not getattr(acc, "native_amp", False):
        return _no_amp, None, "fp32"
    dtype = torch.bfloat16 if s.mixed_precision == "bf16" else torch.float16

    def amp() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(dev, dtype=dtype)

    scaler = torch.amp.GradScaler(dev) if trainer.scaler is not None else None
    return amp, scaler, s.mixed_precision


# ============================================================================ running a case


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _per_batch(w: Window, clock: str) -> float:
    return (w.seconds if clock == "wall" else w.cpu_seconds) / w.batches


def summarise(windows: Sequence[Window], stat: str = "median", clock: str = "wall") -> dict[str, Any]:
    """One implementation's timing.

    ``stat`` ("median" or "min") picks the window that counts; ``clock`` ("wall" or "cpu")
    which time ``images_per_s`` is computed from.
    """
    pick = _median if stat == "median" else min
    per_batch = [w.seconds / w.batches for w in windows]
    cpu_per_batch = [w.cpu_seconds / w.batches for w in windows]
    chosen = pick(per_batch)
    cpu_chosen = pick(cpu_per_batch)
    images_per_batch = windows[0].images / windows[0].batches
    return {
        "images_per_s": images_per_batch / (chosen if clock == "wall" else cpu_chosen),
        "step_ms": 1000 * (chosen if clock == "wall" else cpu_chosen),  # ms per batch on that clock
        "ms_per_batch": 1000 * chosen,
        "ms_per_batch_min": 1000 * min(per_batch),
        "ms_per_batch_windows": [1000 * v for v in per_batch],
        "cpu_ms_per_batch": 1000 * cpu_chosen,
        "cpu_ms_per_batch_windows": [1000 * v for v in cpu_per_batch],
    }


def paired_ratios(windows: dict[str, Sequence[Window]], clock: str = "wall") -> dict[str, Any]:
    """Engine speed / each other implementation's, round by round.

    The windows of one round ran back to back, so a slow phase of the machine (other
    processes, frequency changes) hits them alike; the median of the per-round ratios
    is far steadier than a ratio of two separately chosen windows.
    """
    if "engine" not in windows:
        return {}
    out = {}
    for impl, ws in windows.items():
        if impl != "engine":
            ratios = [_per_batch(o, clock) / _per_batch(e, clock) for e, o in zip(windows["engine"], ws)]
            out[impl] = {"median": _median(ratios), "rounds": ratios}
    return out


def run_case(case: Case, s: Settings, work: Path, data_root: str | None = None, log: Callable[[str], None] = print,
             ) -> dict[str, Any]:
    """Measure the implementations of ``case``; returns its results (see :func:`summarise`).

    Timing: one engine epoch of ``warmup + repeats x steps`` batches. After the engine's
    warm-up window every other implementation warms up; then, round by round, the engine
    runs ``steps`` batches and the others follow with the same batches, in an order that
    rotates each round. Memory: afterwards, a separate window of ``steps`` batches (at
    least 2) per implementation, each starting from a trimmed allocator.
    """
    device = torch.device("cuda" if s.device == "cuda" else "cpu")
    memory = Memory(device)
    trainer = build_trainer(case, s, work, data_root)
    # Clone before the engine trains, so every implementation starts from the same weights.
    clones = {impl: clone_modules(trainer, compile=s.compile) for impl in s.impls if impl != "engine"}
    amp, scaler_proto, precision = _amp_for(trainer, s)
    split = Split(trainer.train_loader.images, trainer.train_loader.labels)
    loops: dict[str, LoopRunner] = {}
    for impl in s.impls:
        if impl != "engine":
            loader = BatchLoader(split, trainer.info, batch_size=s.batch_size, device=device, train=True,
                                 augment=True, seed=s.seed, drop_last=True, channels_last=s.channels_last)
            scaler = torch.amp.GradScaler(device.type) if scaler_proto is not None else None
            loops[impl] = LoopRunner(impl, loop_for(case, impl), clones[impl], loader, device, amp, scaler)
    engine = EngineRunner(trainer) if "engine" in s.impls else None
    counters = [r.counter for r in loops.values()] + ([engine.counter] if engine else [])
    windows: dict[str, list[Window]] = {impl: [] for impl in s.impls}
    others = list(loops)
    warm = max(s.warmup, 1)

    def after(i: int) -> None:
        """Round i (0: warm-up) of the other implementations, after the engine's window i."""
        order = others[i % len(others):] + others[: i % len(others)] if others else []
        for impl in order:
            w = loops[impl].window(warm if i == 0 else s.steps)
            if i > 0:
                windows[impl].append(w)
        if i == 0:
            for c in counters:
                c.count = 0

    engine_wait = 0.0
    if engine is not None:
        ws, engine_wait = engine.run([warm] + [s.steps] * s.repeats, after)
        windows["engine"] = ws[1:]
        engine_total = sum(w.seconds for w in ws)
        engine_forwards = trainer.last_forward_passes
    else:
        for i in range(s.repeats + 1):
            after(i)
    timed = s.steps * s.repeats
    forwards = {impl: c.count / timed for impl, c in zip(list(loops) + ["engine"], counters)}

    # Peak memory, separately: the allocator is trimmed at each window's start.
    mem_n = max(s.steps, 2)
    peaks: dict[str, float | None] = {}
    for impl in s.impls:
        base = memory.start()
        if impl == "engine":
            assert engine is not None
            got: list[int | None] = []
            engine.run([mem_n], lambda i: got.append(memory.peak()))
            peak = got[0]
        else:
            loops[impl].new_epoch()
            loops[impl].window(mem_n)
            peak = memory.peak()
        peaks[impl] = None if peak is None else max(peak - base, 0) / 2**20

    impls: dict[str, Any] = {}
    for impl in s.impls:
        v = summarise(windows[impl], s.stat, s.clock)
        v["forwards_per_batch"] = forwards[impl]
        v["peak_mib"] = peaks[impl]
        if impl == "engine":
            v["data_wait_share"] = engine_wait / max(engine_total, 1e-9)
            v["forwards_per_batch_engine_count"] = engine_forwards
        else:
            v["data_wait_share"] = sum(w.data_wait for w in windows[impl]) / max(sum(w.seconds for w in windows[impl]), 1e-9)
        impls[impl] = v
    out: dict[str, Any] = {
        "case": dataclasses.asdict(case),
        "models": peer_models(case, s.models),
        "precision": precision,
        "min_forwards": min_forwards(case),
        "naive_forwards": naive_forwards(case),
        "impls": impls,
        "paired": paired_ratios(windows, s.clock),
        "windows": {impl: [dataclasses.asdict(w) for w in ws] for impl, ws in windows.items()},
    }
    if s.eval_test:
        _sync(device)
        t0 = time.perf_counter()
        trainer.evaluate()
        _sync(device)
        out["eval_seconds"] = time.perf_counter() - t0
        out["test_images"] = int(trainer.test_loader.num_samples)
        out["train_images_per_epoch"] = len(trainer.train_loader) * s.batch_size
    for c in counters:
        c.remove()
    line = "  ".join(f"{k} {v['ms_per_batch']:.0f} ms ({v['forwards_per_batch']:.0f} fwd)" for k, v in impls.items())
    log(f"{case.name}: {line}")
    return out


# ============================================================================ targets and report


def check_targets(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """PASS/FAIL of the targets (see docs/performance.md), per case and for linearity."""
    per_case = {}
    for r in results:
        name, impls = r["case"]["name"], r["impls"]
        eng = impls.get("engine")
        paired = r.get("paired", {})

        def ratio_to(impl: str) -> float:
            if impl in paired:
                return float(paired[impl]["median"])
            return eng["images_per_s"] / impls[impl]["images_per_s"]

        c: dict[str, Any] = {}
        if eng is not None:
            if "hand" in impls:
                ratio = ratio_to("hand")
                c["engine_vs_hand"] = {"ratio": ratio, "target": 0.95, "pass": ratio >= 0.95}
            if "naive" in impls:
                ratio = ratio_to("naive")
                target = {"kl_dml_alt_n2": 1.25, "kl_dml_alt_n4": 2.0}.get(name)
                c["engine_vs_naive"] = {"ratio": ratio, "target": target, "pass": None if target is None else ratio >= target}
            fwd = eng["forwards_per_batch"]
            c["forwards"] = {"engine": fwd, "minimum": r["min_forwards"], "pass": abs(fwd - r["min_forwards"]) < 1e-9}
            share = eng["data_wait_share"]
            c["data_wait"] = {"share": share, "target": 0.03, "pass": share < 0.03}
        per_case[name] = c
    lin = linearity(results)
    return {"cases": per_case, "linearity": lin}


def linearity(results: Sequence[dict[str, Any]], tolerance: float = 1.25) -> dict[str, Any]:
    """Time per batch / N of KL-DML alternating: 'roughly linear' = max/min within ``tolerance``."""
    rows = {}
    for r in results:
        c = r["case"]
        if c["strategy"] == "kl_dml" and c["mode"] == "alternating" and "engine" in r["impls"]:
            rows[c["n"]] = {impl: v["step_ms"] / c["n"] for impl, v in r["impls"].items()}
    if len(rows) < 2:
        return {"per_n": rows, "pass": None, "spread": None, "tolerance": tolerance}
    eng = [v["engine"] for v in rows.values()]
    spread = max(eng) / min(eng)
    return {"per_n": rows, "spread": spread, "tolerance": tolerance, "pass": spread <= tolerance}


def _pf(v: bool | None) -> str:
    return "-" if v is None else ("PASS" if v else "FAIL")


def markdown(report: dict[str, Any]) -> str:
    s, res, tg = report["settings"], report["results"], report["targets"]
    m = report["machine"]
    lines = [
        f"Device {s['device']}, precision {s['mixed_precision']}, channels_last {s['channels_last']},"
        f" compile {s['compile']}, batch {s['batch_size']}, {s['dataset']} at {s['image_size']}x{s['image_size']},"
        f" warm-up {s['warmup']} batches, {s['repeats']} rounds x {s['steps']} batches per implementation"
        f" ({s['stat']} window), images/s from {s['clock']} time, ratios: median of the per-round ratios,"
        f" torch threads {m['torch_threads']}.",
        f"Machine: {m['cpu']}, {m['nproc']} CPUs, torch {m['torch']}, {m.get('gpu') or 'no GPU'};"
        f" load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after.",
        "",
        "| case | impl | images/s | ms/batch | CPU ms/batch | fwd/batch | peak mem (MiB) | data wait |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res:
        for impl, v in r["impls"].items():
            mem = "n/a" if v["peak_mib"] is None else f"{v['peak_mib']:.0f}"
            lines.append(f"| {r['case']['name']} | {impl} | {v['images_per_s']:.1f} | {v['ms_per_batch']:.0f} |"
                         f" {v['cpu_ms_per_batch']:.0f} | {v['forwards_per_batch']:g} | {mem} |"
                         f" {100 * v['data_wait_share']:.2f}% |")
    lines += ["", "| case | engine/hand | >= 0.95 | engine/naive | target | fwd (engine/min) | fwd | data wait < 3% |",
              "|---|---:|---|---:|---|---:|---|---|"]
    for name, c in tg["cases"].items():
        eh = c.get("engine_vs_hand")
        en = c.get("engine_vs_naive")
        fw = c.get("forwards", {})
        dw = c.get("data_wait", {})
        lines.append(
            f"| {name} | {eh['ratio']:.3f} | {_pf(eh['pass'])} |" if eh else f"| {name} | - | - |"
        )
        lines[-1] += (f" {en['ratio']:.2f} | {('>= %g ' % en['target']) + _pf(en['pass']) if en['target'] else '-'} |"
                      if en else " - | - |")
        lines[-1] += (f" {fw.get('engine', 0):g}/{fw.get('minimum', 0)} | {_pf(fw.get('pass'))} |"
                      f" {_pf(dw.get('pass'))} |")
    lin = tg["linearity"]
    if lin["per_n"]:
        impls = list(next(iter(lin["per_n"].values())))
        lines += ["", f"KL-DML alternating, time per batch / N (ms, {s['clock']} time):", "",
                  "| N | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
        for n, row in sorted(lin["per_n"].items()):
            lines.append(f"| {n} | " + " | ".join(f"{row[i]:.0f}" for i in impls) + " |")
        if lin["spread"] is not None:
            lines += ["", f"Engine max/min of (time per batch / N): {lin['spread']:.2f}"
                          f" (roughly linear if <= {lin['tolerance']}): {_pf(lin['pass'])}"]
    for r in res:
        if "eval_seconds" in r:
            lines += ["", f"{r['case']['name']}: evaluation of {r['test_images']} test images"
                          f" {r['eval_seconds']:.2f} s"]
    lines += ["", f"Peak memory: {report['memory_measured']}."]
    return "\n".join(lines) + "\n"


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lscpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = "\n".join(subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10])
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "gpu": gpu, "lscpu": lscpu, "load_before": list(os.getloadavg()),
    }


# ============================================================================ command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings (batch 32, 2 warm-up batches, 30 rounds x 1 batch)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every peer (engine: run.compile)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of engine,hand,naive")
    p.add_argument("--models", default=",".join(MODELS), help="peer i is models[i %% len(models)]")
    p.add_argument("--dataset", choices=("digits", "fake-cifar10", "fake-cifar100"), default="digits")
    p.add_argument("--image-size", type=int, default=32, help="digits are resized to this size (CIFAR: 32)")
    p.add_argument("--fake-train", type=int, default=None, help="train images of the fake CIFAR split")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="batches per implementation and round (one timed window)")
    p.add_argument("--repeats", type=int, default=None, help="rounds; warm-up + steps x repeats must fit in one epoch")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the timed windows (min is less sensitive to other load)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time behind images/s and the targets: wall clock, or process CPU time (with --threads 1,"
                        " insensitive to other processes on a shared CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--eval-test", action="store_true", help="also time one evaluation of the whole test split")
    p.add_argument("--project-epochs", type=int, default=None,
                   help="print the projected wall time of this many epochs (train + evaluation)")
    p.add_argument("--goal-minutes", type=float, default=None, help="PASS/FAIL of the projected wall time against this")
    p.add_argument("--work-dir", default=None, help="where runs are written (default: a temporary folder)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None)
    a = p.parse_args(argv)
    quick = dict(batch_size=32, warmup=2, steps=1, repeats=30)
    full = dict(batch_size=64, warmup=2, steps=1, repeats=18)
    base = quick if a.quick else full
    s = Settings(
        device=a.device,
        batch_size=a.batch_size or base["batch_size"],
        warmup=a.warmup if a.warmup is not None else base["warmup"],
        steps=a.steps or base["steps"],
        repeats=a.repeats or base["repeats"],
        mixed_precision=a.mixed_precision,
        channels_last=a.channels_last,
        compile=a.compile,
        dataset=a.dataset,
        image_size=a.image_size,
        models=tuple(x for x in a.models.split(",") if x),
        impls=tuple(x for x in a.impls.split(",") if x),
        threads=a.threads,
        eval_test=a.eval_test or a.project_epochs is not None,
        stat=a.stat,
        clock=a.clock,
        work_dir=a.work_dir,
    )
    if a.fake_train:
        s.fake_train = a.fake_train
        s.fake_test = max(a.fake_train // 5, 20)
    unknown = set(s.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementations {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    names = {c.name for c in CASES}
    bad = [c for c in a.cases.split(",") if c and c not in names]
    if bad:
        p.error(f"unknown cases {bad}; choose from {', '.join(sorted(names))}")
    if s.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if s.device == "cpu" and s.mixed_precision == "fp16":
        p.error("--mixed-precision fp16 needs --device cuda (the engine refuses fp16 on a CPU); use bf16")
    return s, a


def write_fake_cifar(root: Path, kind: str, *, n_train: int, n_test: int, seed: int) -> Path:
    """A CIFAR tree of seeded random images in torchvision's pickle layout under ``root`` (the data to time on)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    k = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"

    def dump(obj: dict[bytes, object], name: str) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def batch(n: int) -> dict[bytes, object]:
        labels = rng.permutation(np.arange(n) % k)
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [int(v) for v in labels]}

    if kind == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(batch(len(part)), f"data_batch_{i}")
        dump(batch(n_test), "test_batch")
        dump({b"label_names": [f"class{i}".encode() for i in range(k)]}, "batches.meta")
    else:
        dump(batch(n_train), "train")
        dump(batch(n_test), "test")
        dump({b"fine_label_names": [f"fine{i}".encode() for i in range(k)]}, "meta")
    return folder


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    s, a = parse_args(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    cases = [c for c in CASES if c.name in a.cases.split(",")]
    machine = machine_info(s.device)
    busy = machine["load_before"][0] / max(machine["nproc"] or 1, 1)
    if busy > 0.5:
        print(f"warning: load average {machine['load_before'][0]:.1f} on {machine['nproc']} CPUs: other processes"
              " compete for the CPU and the timings are noisy (with OpenMP, --threads 1 suffers less)",
              file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        work = Path(s.work_dir) if s.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mkd-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        data_root = None
        if s.dataset != "digits":
            kind = s.dataset.removeprefix("fake-")
            data_root = str(work / "data")
            write_fake_cifar(Path(data_root), kind, n_train=s.fake_train, n_test=s.fake_test, seed=s.seed)
        t0 = time.perf_counter()
        results = [run_case(c, s, work / "runs", data_root, log=lambda m: print(m, file=sys.stderr, flush=True))
                   for c in cases]
        wall = time.perf_counter() - t0
    machine["load_after"] = list(os.getloadavg())
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(s),
        "machine": machine,
        "memory_measured": Memory(torch.device(s.device)).what,
        "wall_seconds": wall,
        "results": results,
        "targets": check_targets(results),
    }
    if a.project_epochs:
        report["projection"] = [projection(r, a.project_epochs, goal_minutes=a.goal_minutes)
                                for r in results if "engine" in r["impls"]]
    md = markdown(report)
    for pr in report.get("projection", []):
        md += (f"\nProjected {pr['epochs']} epochs of {pr['case']} ({pr['train_images_per_epoch']} train images/epoch,"
               f" {pr['images_per_s']:.0f} images/s, evaluation {pr['eval_seconds']:.1f} s/epoch):"
               f" {pr['minutes']:.1f} min"
               + (f" (goal < {pr['goal_minutes']:g} min: {_pf(pr['pass'])})" if pr["goal_minutes"] else "") + "\n")
    md += f"\nBenchmark wall time {wall:.0f} s.\n"
    print(md)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if a.md_out:
        Path(a.md_out).write_text(md, encoding="utf-8")
    return report


def projection(r: dict[str, Any], epochs: int, train_images: int | None = None,
               goal_minutes: float | None = None) -> dict[str, Any]:
    """Wall time of ``epochs`` epochs: train images / engine images/s + one evaluation, per epoch."""
    ips = r["impls"]["engine"]["images_per_s"]
    per_epoch_images = train_images or r.get("train_images_per_epoch", 0)
    ev = float(r.get("eval_seconds", 0.0))
    seconds = epochs * (per_epoch_images / ips + ev)
    return {"case": r["case"]["name"], "epochs": epochs, "train_images_per_epoch": per_epoch_images,
            "images_per_s": ips, "eval_seconds": ev, "seconds": seconds, "minutes": seconds / 60,
            "goal_minutes": goal_minutes, "pass": None if goal_minutes is None else seconds / 60 < goal_minutes}


if __name__ == "__main__":
    main()

"""Measuring: timing windows (the engine's through its batch hooks), paired ratios, memory, forward passes.

A *window* is consecutive batches of one implementation, timed as one span with a
device synchronisation at both ends. The engine runs in one ``fit()``: the
:class:`EngineWindows` callback cuts its epoch into windows of planned sizes and, at the
end of each, hands over to the other implementations (:class:`LoopRunner`), which run
their windows on the same batches before the engine's next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import ctypes
from dataclasses import dataclass
import gc
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from mutualkd.data import BatchLoader
from mutualkd.engine import Callback, StepResult, Trainer
from reference import AmpFactory, LoopFn, Peers

__all__ = [
    "Window",
    "ForwardCounter",
    "Memory",
    "EngineWindows",
    "EngineRunner",
    "LoopRunner",
    "sync",
    "summarise",
    "paired_ratios",
]


@dataclass
class Window:
    """Consecutive batches of one implementation, timed as one span (see the module docstring)."""

    seconds: float
    cpu_seconds: float  # process CPU time over the same span
    batches: int
    images: int
    data_wait: float = 0.0  # time spent fetching batches (loops; the engine's comes from its own record)
    step_seconds: float = 0.0  # host time inside the batch steps (the rest: fetching, bookkeeping)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a window's edge); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardCounter:
    """Counts forward calls of the given modules made in training mode (evaluation is not counted).

    With ``compiled``, the modules run inside ``torch.compile`` wrappers: the counting hook
    is kept out of the compiled graph, so it runs on every call.
    """

    def __init__(self, modules: Sequence[nn.Module], *, compiled: bool = False) -> None:
        self.count = 0
        hook = torch.compiler.disable(self._hook) if compiled else self._hook
        self._handles = [m.register_forward_pre_hook(hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.count += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ============================================================================ memory


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


# ============================================================================ the engine's windows


class EngineWindows(Callback):
    """Cuts the engine's epoch into windows of planned sizes, through its batch hooks (instrumentation only).

    After the window's last batch (``on_batch_end``, which runs after the engine's own
    step logging and checkpoint cadence) it waits for the device, records the window
    and calls ``after(i)``: the other implementations run their windows there, back to
    back with the engine's. The next window starts when that call returns (after
    another device synchronisation), so a window covers everything the engine's loop
    does per batch: fetching the batch, the training step (strategy, backward,
    optimizer and scheduler steps, the finite-loss check), the hooks and step logging.
    ``step_seconds`` is the part between ``on_batch_start`` and ``on_batch_end``.
    ``epoch_record`` is the record of the last epoch the engine ended (``on_epoch_end``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sizes: list[int] = []
        self.after: Callable[[int], None] = lambda i: None
        self.windows: list[Window] = []
        self.epoch_record: Mapping[str, Any] = {}
        self._batches = self._images = 0
        self._t0 = self._c0 = self._step_t0 = self._step_seconds = 0.0

    def plan(self, sizes: Sequence[int], after: Callable[[int], None]) -> None:
        """Windows of ``sizes`` batches from now on; ``after(i)`` runs at the end of window i."""
        self.sizes, self.after, self.windows = list(sizes), after, []
        self._start()

    def _start(self) -> None:
        self._batches = self._images = 0
        self._step_seconds = 0.0
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_batch_start(self, trainer: Trainer, inputs: Tensor, labels: Tensor) -> None:
        self._images += int(inputs.shape[0])
        self._step_t0 = time.perf_counter()

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        i = len(self.windows)
        if i >= len(self.sizes):
            return
        self._step_seconds += time.perf_counter() - self._step_t0
        self._batches += 1
        if self._batches < self.sizes[i]:
            return
        sync(self.device)
        self.windows.append(Window(time.perf_counter() - self._t0, time.process_time() - self._c0, self._batches,
                                   self._images, step_seconds=self._step_seconds))
        self.after(i)
        sync(self.device)
        self._start()

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self.epoch_record = record


class EngineRunner:
    """Drives a Trainer through ``fit()``: one epoch cut into windows (see :class:`EngineWindows`)."""

    name = "engine"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.probe = EngineWindows(trainer.device)
        trainer.add_callback(self.probe)
        self.counter = ForwardCounter([trainer.unwrapped(n) for n in trainer.peer_names],
                                      compiled=trainer.recipe.run.compile)

    def run(self, sizes: Sequence[int], after: Callable[[int], None]) -> tuple[list[Window], float]:
        """Train ``sum(sizes)`` batches in one new epoch; returns the windows and the epoch's data wait (s)."""
        t = self.trainer
        if t.position.batch != 0:
            raise RuntimeError("the engine must start a window plan at an epoch boundary")
        if sum(sizes) > len(t.train_loader):
            raise SystemExit(f"--warmup + --steps x --repeats = {sum(sizes)} batches do not fit in one epoch"
                             f" ({len(t.train_loader)} batches of this data set and batch size)")
        self.probe.plan(sizes, after)
        t.recipe.run.max_steps = t.position.global_step + sum(sizes)
        t.fit()  # max_steps ends the epoch after the plan; its evaluation and checkpoint are not timed
        epoch = self.probe.epoch_record  # as written to metrics.jsonl
        return self.probe.windows, float(epoch["data_wait_share"]) * float(epoch["train_seconds"])


# ============================================================================ the loops' windows


class LoopRunner:
    """Runs a hand-written or naive loop over the same sequence of batches the engine sees."""

    def __init__(self, name: str, fn: LoopFn, modules: Peers, loader: BatchLoader, device: torch.device,
                 amp: AmpFactory, scaler: torch.amp.GradScaler | None, *, compiled: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.m = modules
        self.loader = loader
        self.device = device
        self.amp = amp
        self.scaler = scaler
        self.counter = ForwardCounter(modules.modules, compiled=compiled)
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
        """``n`` batches (fetch + step), timed with a device synchronisation at both ends."""
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        wait = step = 0.0
        images = 0
        for _ in range(n):
            tw = time.perf_counter()
            x, y = self._next()
            ts = time.perf_counter()
            wait += ts - tw
            self.fn(self.m, x, y, amp=self.amp, scaler=self.scaler)
            step += time.perf_counter() - ts
            images += int(x.shape[0])
        sync(self.device)
        return Window(time.perf_counter() - t0, time.process_time() - c0, n, images, wait, step)


# ============================================================================ statistics


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

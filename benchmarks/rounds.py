"""One case, measured in rounds: the engine's window, then the same batches through each loop.

All implementations start from identical weights (the loops get deep copies of the
engine's modules before any step), use the same optimizer settings, and read the same
sequence of batches: a :class:`mutualkd.data.BatchLoader` with the run's seed, whose
order and augmentation are a pure function of (seed, epoch, batch).

The engine trains one epoch of ``warmup + repeats x steps`` batches in a single
``fit()``; the loops run inside it, between the engine's windows (see measure.py). The
first round is the warm-up. Per implementation the median window is reported; the
ratios the targets compare (engine/hand, engine/naive) are the median of the per-round
ratios. Peak memory is measured afterwards, in one more window per implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from pathlib import Path
import time
from typing import Any

import torch

from cases import Case, Settings, build_trainer, min_forwards, naive_forwards, peer_models
from measure import EngineRunner, LoopRunner, Memory, Window, paired_ratios, summarise, sync
from mutualkd.data import BatchLoader, Split
from mutualkd.engine import Callback
from reference import clone_modules, loop_for, loop_precision

__all__ = ["run_case"]


def run_case(case: Case, s: Settings, work: Path, data_root: str | None = None, log: Callable[[str], None] = print,
             callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Measure the implementations of ``case``; returns its results (see :func:`measure.summarise`).

    Timing: one engine epoch of ``warmup + repeats x steps`` batches. After the engine's
    warm-up window every other implementation warms up; then, round by round, the engine
    runs ``steps`` batches and the others follow with the same batches, in an order that
    rotates each round. Memory: afterwards, a separate window of ``steps`` batches (at
    least 2) per implementation, each starting from a trimmed allocator. ``callbacks``
    are given to the engine's Trainer as well (they run before the window probe).
    """
    device = torch.device("cuda" if s.device == "cuda" else "cpu")
    memory = Memory(device)
    trainer = build_trainer(case, s, work, data_root, callbacks=callbacks)
    # Clone before the engine trains, so every implementation starts from the same weights.
    clones = {impl: clone_modules(trainer, compile=s.compile) for impl in s.impls if impl != "engine"}
    amp, scaled, precision = loop_precision(trainer)
    split = Split(trainer.train_loader.images, trainer.train_loader.labels)
    loops: dict[str, LoopRunner] = {}
    for impl in s.impls:
        if impl != "engine":
            loader = BatchLoader(split, trainer.info, batch_size=s.batch_size, device=device, train=True,
                                 augment=True, seed=s.seed, drop_last=True, channels_last=s.channels_last)
            scaler = torch.amp.GradScaler(device.type) if scaled else None
            loops[impl] = LoopRunner(impl, loop_for(case, impl), clones[impl], loader, device, amp, scaler,
                                     compiled=s.compile)
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

    engine_wait = engine_total = 0.0
    engine_forwards = 0
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
        sync(device)
        t0 = time.perf_counter()
        trainer.evaluate()
        sync(device)
        out["eval_seconds"] = time.perf_counter() - t0
        out["test_images"] = int(trainer.test_loader.num_samples)
        out["train_images_per_epoch"] = len(trainer.train_loader) * s.batch_size
    for c in counters:
        c.remove()
    line = "  ".join(f"{k} {v['ms_per_batch']:.0f} ms ({v['forwards_per_batch']:.0f} fwd)" for k, v in impls.items())
    log(f"{case.name}: {line}")
    return out

"""Where the engine's training step spends its time, next to the hand-written loop's.

Builds one benchmark case (see cases.py), then calls the engine's training step
(``trainer.train_step``, without ``fit()`` around it) and the hand-written loop
(reference.py) alternately on the same batches, and prints:

* the median wall time per batch of each, and the median of the per-batch ratios;
* with ``--profile``: a cProfile of ``--batches`` steps of each, as the functions whose
  own time (or call count) differs most between the two, engine minus hand.

    python benchmarks/profile_step.py --case ie_dml_alt_n2 --threads 2 --batches 80
    python benchmarks/profile_step.py --case ie_dml_alt_n2 --profile --batches 10
"""

from __future__ import annotations

import argparse
import cProfile
from pathlib import Path
import pstats
import statistics
import sys
import tempfile
import time

import torch

# The sibling modules, also when this file is loaded by path (tests).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from cases import CASES, Settings, build_trainer  # noqa: E402
from reference import clone_modules, loop_for  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="ie_dml_alt_n2", choices=[c.name for c in CASES])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--batches", type=int, default=60, help="steps of each implementation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="cProfile both and print the largest differences")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    case = next(c for c in CASES if c.name == a.case)
    s = Settings(batch_size=a.batch_size, warmup=1, steps=1, repeats=1)
    with tempfile.TemporaryDirectory(prefix="mkd-profile-") as work:
        trainer = build_trainer(case, s, Path(work))
        hand = clone_modules(trainer)
        fn = loop_for(case, "hand")
        batches = iter(trainer.train_loader)
        data = [next(batches) for _ in range(4)]

        def engine(i: int) -> None:
            # One batch of the first stage: train/eval modes, steps, finiteness check, epoch sums.
            trainer.train_step(*data[i % len(data)])

        def loop(i: int) -> None:
            fn(hand, *data[i % len(data)])

        for i in range(3):  # warm-up
            engine(i)
            loop(i)
        times: dict[str, list[float]] = {"engine": [], "hand": []}
        for i in range(a.batches):
            pair = [("engine", engine), ("hand", loop)]
            for name, f in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                f(i)
                times[name].append(time.perf_counter() - t0)
        e, h = times["engine"], times["hand"]
        print(f"{case.name}, batch {a.batch_size}, {torch.get_num_threads()} threads, {a.batches} batches each:"
              f" engine {1000 * statistics.median(e):.1f} ms, hand {1000 * statistics.median(h):.1f} ms per batch;"
              f" median of per-batch hand/engine {statistics.median([y / x for x, y in zip(e, h)]):.4f}")
        if not a.profile:
            return
        stats = {}
        for name, f in (("engine", engine), ("hand", loop)):
            prof = cProfile.Profile()
            prof.enable()
            for i in range(a.batches):
                f(i)
            prof.disable()
            raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            stats[name] = {f"{Path(k[0]).name}:{k[1]}({k[2]})": (v[1], v[2]) for k, v in raw.items()}
        rows = []
        for key in set(stats["engine"]) | set(stats["hand"]):
            ec, et = stats["engine"].get(key, (0, 0.0))
            hc, ht = stats["hand"].get(key, (0, 0.0))
            rows.append((et - ht, ec - hc, key))
        rows.sort(reverse=True)
        print(f"\nown time, engine minus hand, over {a.batches} batches (ms), and call-count difference:")
        for dt, dc, key in rows[: a.top]:
            print(f"{1000 * dt:9.2f} {dc:+7d}  {key}")


if __name__ == "__main__":
    main()

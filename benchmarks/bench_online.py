"""ONE on the engine against ONE written by hand, and against three independent networks (KL-DML).

Three implementations, built in one process from the same seed, trained on the same batches
(scikit-learn's digits at 32 px, random crop) and timed alternately, one batch each per round:

* ``engine``: ``mutualkd.engine.Trainer`` on a ONE recipe (a CIFAR ResNet-20 split after
  ``layer2`` into 3 branches, the gate), driven batch by batch through ``train_step``;
* ``hand``: the same network and gate (copies of the engine's), the same loss functions
  (``one_terms``), the minimal passes written out: the trunk once, three branches, the gate,
  one backward, one SGD step;
* ``kl_dml``: three whole ResNet-20s trained with KL-DML (one step for all), the cost of not
  sharing the trunk.

It prints the median over rounds of the speed ratios engine / hand (hand's batch time over the
engine's: 1.0 is as fast as the hand-written loop) and ONE / KL-DML (KL-DML's batch time over
ONE's: the saving of the shared trunk), each with a 95 % bootstrap interval of the median, and
the images per second of each.

    python benchmarks/bench_online.py --threads 1 --rounds 40
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from mutualkd.config import parse_recipe
from mutualkd.engine import Trainer
from mutualkd_builtins.losses import sigmoid_rampup
from mutualkd_builtins.strategies.one import one_terms


def recipe(out_dir: Path, strategy: str, batch_size: int, device: str) -> dict[str, Any]:
    branched = strategy == "one"
    return {
        "run": {"name": strategy, "out_dir": str(out_dir), "epochs": 1000, "progress": False, "device": device,
                "seed": 0},
        "data": {"dataset": "digits", "image_size": 32, "batch_size": batch_size, "augment": True},
        "peers": ([{"model": "cifar_resnet20", "name": "net", "branches": 3, "split_after": "layer2"}] if branched
                  else [{"model": "cifar_resnet20"} for _ in range(3)]),
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4},
        "strategy": {"name": strategy, **({"rampup_epochs": 80} if branched else {})},
        "schedule": {"mode": "simultaneous"},
    }


class HandONE:
    """ONE's batch written out: one trunk pass, K branches, the gate, one backward, one SGD step."""

    def __init__(self, trainer: Trainer) -> None:
        self.net = copy.deepcopy(trainer.unwrapped("net")).train()
        self.gate = copy.deepcopy(trainer.unwrapped("gate")).train()
        params = [*self.net.parameters(), *self.gate.parameters()]
        self.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> None:
        h = self.net.run_trunk(x)
        logits = [self.net.run_branch(k, h)[1] for k in range(self.net.num_branches)]
        branches, ensemble = one_terms(logits, self.gate(h), y, temperature=3.0, weight=sigmoid_rampup(epoch, 80))
        loss = torch.stack([v for t in [*branches, ensemble] for v in t.values()]).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        # the engine checks every term for finiteness once per batch (one host sync): so does this loop
        bool(torch.isfinite(loss))


def _bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds of one batch of each implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = "cpu" if a.device == "cpu" else "auto"
    with tempfile.TemporaryDirectory(prefix="mkd-online-") as work:
        one = Trainer(parse_recipe(recipe(Path(work), "one", a.batch_size, dev), file="<bench>"), recipe_file="<bench>")
        dml = Trainer(parse_recipe(recipe(Path(work), "kl_dml", a.batch_size, dev), file="<bench>"), recipe_file="<bench>")
        hand = HandONE(one)
        batches = iter(one.train_loader)
        data = [next(batches) for _ in range(8)]
        sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
        impls = {"engine": lambda b: one.train_step(*b), "hand": lambda b: hand.step(*b),
                 "kl_dml": lambda b: dml.train_step(*b)}
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(a.warmup + a.rounds):
            order = list(impls) if r % 2 == 0 else list(reversed(impls))  # no implementation always first
            for name in order:
                batch = data[r % len(data)]
                sync()
                t0 = time.perf_counter()
                impls[name](batch)
                sync()
                dt = time.perf_counter() - t0
                if r >= a.warmup:
                    times[name].append(dt)
    eh = [h / e for e, h in zip(times["engine"], times["hand"])]  # speed of the engine relative to the hand loop
    de = [d / e for d, e in zip(times["kl_dml"], times["engine"])]  # speed of ONE relative to 3 whole networks
    out = {
        "device": a.device, "threads": torch.get_num_threads(), "batch_size": a.batch_size, "rounds": a.rounds,
        "images_per_s": {k: a.batch_size / statistics.median(v) for k, v in times.items()},
        "engine_vs_hand_speed": {"median": statistics.median(eh), "ci95": _bootstrap(eh)},
        "one_vs_kl_dml3_speed": {"median": statistics.median(de), "ci95": _bootstrap(de)},
    }
    print(json.dumps(out, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

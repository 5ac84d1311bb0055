"""Step-time benchmark: the mutualkd engine against a hand-written and a naive loop.

For each case (KL-DML alternating with N = 2, 3, 4 peers, KL-DML simultaneous N = 2,
IE-DML alternating N = 2) three implementations train the same peers on the same
batches, in one process:

* ``engine``: :class:`mutualkd.engine.Trainer` built from a recipe dict, driven through
  its public ``fit()``: one epoch of ``--warmup`` + ``--steps`` x ``--repeats`` batches
  (``run.max_steps`` ends it). A callback on the engine's batch hooks cuts it into
  windows of ``--steps`` batches and runs the other implementations between them.
* ``hand``: a loop written for the case with the minimal passes;
* ``naive``: the style of the published DML code (every update re-forwards every peer).

The files, one concept each:

* ``cases.py``: the cases, the settings, the recipe the engine runs;
* ``reference.py``: the hand-written and naive loops and their copies of the modules;
* ``measure.py``: timing windows (the engine's through its hooks), memory, forward
  passes, paired ratios;
* ``rounds.py``: one case measured in rounds (:func:`rounds.run_case`);
* ``bench_engine.py`` (this file): the command line, the targets and the report.

    python benchmarks/bench_engine.py --quick                   # about 2.5 min on a quiet 2-core CPU
    python benchmarks/bench_engine.py --json-out b.json --md-out b.md
    python benchmarks/bench_engine.py --device cuda --mixed-precision bf16 --channels-last

See benchmarks/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import contextlib
import dataclasses
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

# The sibling modules, also when this file is loaded by path (tests, profile_step.py).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from cases import CASES, IMPLS, MODELS, Settings, write_fake_cifar  # noqa: E402
from measure import Memory  # noqa: E402
from rounds import run_case  # noqa: E402

__all__ = ["check_targets", "linearity", "markdown", "machine_info", "parse_args", "projection", "main"]


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

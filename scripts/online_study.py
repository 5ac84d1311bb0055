"""Every online-distillation strategy under one protocol: the all-methods study of docs/results.md.

    python scripts/online_study.py [--out DIR] [--scale cpu|paper|tiny] [--seeds 0 1 2]
                                   [--jobs N] [--print] [--analyze-only] [--data-root DIR]

Arms (one run folder per arm and seed, ``DIR/<arm>-s<seed>``), every one on the same backbone,
optimizer, schedule and data: ``independent``, ``independent_balanced`` (the same on MCL's
class-balanced batches), ``kl_dml``, ``ie_dml``, ``kdcl``, ``mcl``, ``switokd`` (two whole
networks each) and ``one`` (3 branches), ``cl_ilr`` (4, ILR), ``okddip`` (4), ``pcl`` (3),
``ffl`` (2): one network split after layer2.

Scales: ``cpu`` (Fashion-MNIST at 16 px, the 5 000-image subset and full test split of
scripts/fashion_mnist_study.py's cpu scale, WRN-16-1, 40 epochs, cosine), ``paper`` (CIFAR-100
under ``--data-root``, ResNet-32, 300 epochs, x0.1 at 150 and 225: the PCL paper's protocol, under
which most of the quoted numbers were measured; for a GPU), ``tiny`` (400 images, 2 epochs, seeds
0 1: a minutes-long check whose numbers mean nothing).

Each run is a ``mutualkd run`` subprocess; its peak resident memory is the ``ru_maxrss`` that
``os.wait4`` returns for that child. A finished run is skipped, an interrupted one resumed, so
the same command continues the study. It ends by writing ``DIR/online_study.md`` and
``DIR/online_study.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist_study as fms  # noqa: E402
from study_stats import MIN_EFFECT, mean_interval, paired_test  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    """Data, backbone and budget of one scale; every arm uses all of it."""

    name: str
    data: dict[str, Any]
    model: str
    epochs: int
    batch: int
    scheduler: dict[str, Any]
    rampup_epochs: int  # the authors' 80 of 300 epochs, scaled to the budget
    balanced_batch: int  # MCL's class-balanced batches: balanced_batch / images_per_class classes
    images_per_class: int
    seeds: tuple[int, ...]


def make_scale(name: str, data_root: Path | None = None) -> Scale:
    if name == "cpu":
        # 10 classes x 12 images = 120: MCL and its baseline get every class in every batch.
        return Scale("cpu", fms.make_scale("cpu", None).data, "cifar_wrn_16_1", fms.CPU_EPOCHS, 128,
                     {"name": "cosine"}, 10, 120, 12, (0, 1, 2))
    if name == "tiny":
        data = {"dataset": "fashion_mnist", "image_size": 16, "train_subset": 400, "subset_seed": 0,
                "test_subset": 500, "eval_batch_size": 500}
        return Scale("tiny", data, "cifar_wrn_16_1", 2, 128, {"name": "cosine"}, 1, 120, 12, (0, 1))
    if name == "paper":
        data = {"dataset": "cifar100", "root": str(data_root or REPO / "data"), "eval_batch_size": 1000}
        # 64 classes x 2 images = 128: the MCL authors' sampler at the common batch size.
        return Scale("paper", data, "cifar_resnet32", 300, 128,
                     {"name": "multistep", "milestones": [150, 225], "gamma": 0.1}, 80, 128, 2, (0, 1, 2))
    raise SystemExit(f"unknown scale {name!r}; use cpu, paper or tiny")


# --------------------------------------------------------------------------- arms
# arm: (label, networks, literature CIFAR-100 top-1 ResNet-32, ResNet-110, source), quoted from
# the methods' specification (METHODS-ONLINE.md), not measured here.
METHODS: dict[str, tuple[str, str, float | None, float | None, str]] = {
    "independent": ("independent", "2 networks", None, None, ""),
    "independent_balanced": ("independent, balanced batches", "2 networks", None, None, ""),
    "kl_dml": ("KL-DML", "2 networks", None, None, ""),
    "ie_dml": ("IE-DML", "2 networks", None, None, ""),
    "one": ("ONE", "3 branches", 73.79, 78.40, "PCL paper's re-run"),
    "cl_ilr": ("CL-ILR", "4 branches, ILR", 72.33, 78.83, "PCL paper's re-run"),
    "okddip": ("OKDDip", "4 branches (3 peers, leader)", 74.35, None, "OKDDip paper"),
    "pcl": ("PCL", "3 branches, a view each", 74.14, 79.98, "PCL paper"),
    "ffl": ("FFL", "2 branches + fusion", 72.18, None, "PCL paper's re-run (FFL-S)"),
    "kdcl": ("KDCL", "2 networks, a view each", 73.76, None, "PCL paper's re-run"),
    "mcl": ("MCL", "2 networks, balanced batches", 72.96, None, "MCL paper, x2 (x4: 74.04)"),
    "switokd": ("SwitOKD", "2 networks (teacher lr 0.1, student 0.01)", None, None, ""),
}
BRANCHED = {"one": 3, "cl_ilr": 4, "okddip": 4, "pcl": 3, "ffl": 2}  # the authors' branch counts
BALANCED = {"independent_balanced", "mcl"}


def strategy(arm: str, scale: Scale) -> dict[str, Any]:
    """The arm's strategy table: the authors' settings, ramps scaled to the budget."""
    r = scale.rampup_epochs
    return {
        "independent": {"name": "independent"},
        "independent_balanced": {"name": "independent"},
        "kl_dml": {"name": "kl_dml", "temperature": 1.0, "weight": 1.0},
        "ie_dml": {"name": "ie_dml", **fms.IE},
        "one": {"name": "one", "temperature": 3.0, "rampup_epochs": r},
        "cl_ilr": {"name": "cl_ilr", "temperature": 2.0, "alpha": 0.5},
        "okddip": {"name": "okddip", "temperature": 3.0, "rampup_epochs": r, "detach_targets": False},
        "pcl": {"name": "pcl", "temperature": 3.0, "rampup_epochs": r, "views": "per_branch"},
        "ffl": {"name": "ffl", "temperature": 3.0, "rampup_epochs": r, "fusion_weight_decay": 1e-5},
        "kdcl": {"name": "kdcl", "variant": "mean", "temperature": 4.0, "alpha": 0.5, "views": "per_peer"},
        "mcl": {"name": "mcl", "tau": 0.1, "temperature": 3.0},
        "switokd": {"name": "switokd"},
    }[arm]


def recipe(arm: str, scale: Scale, out: Path, seed: int) -> dict[str, Any]:
    m = scale.model
    data = dict(scale.data, batch_size=scale.batch, augment=True)
    if arm in BALANCED:
        data.update(batch_size=scale.balanced_batch, images_per_class=scale.images_per_class)
    if arm in BRANCHED:
        peers = [{"model": m, "name": "net", "branches": BRANCHED[arm], "split_after": "layer2",
                  **({"ilr": True} if arm == "cl_ilr" else {})}]
    elif arm == "switokd":  # the first table is the teacher; the student has the authors' lr 0.01
        peers = [{"model": m, "name": "teacher"}, {"model": m, "name": "student", "optimizer": dict(fms.SGD, lr=0.01)}]
    else:
        peers = [{"model": m}, {"model": m}]
    return {
        "run": {"name": f"{arm}-s{seed}", "seed": seed, "epochs": scale.epochs, "out_dir": str(out), "log_every": 50,
                "progress": False, "resume": "auto"},
        "data": data,
        "peers": peers,
        "optimizer": dict(fms.SGD),
        "scheduler": dict(scale.scheduler),
        "strategy": strategy(arm, scale),
    }


def plan(scale: Scale, out: Path, seeds: Sequence[int]) -> list[tuple[str, int, dict[str, Any]]]:
    """Every (arm, seed, recipe), seed by seed, so that early seeds finish first."""
    return [(arm, seed, recipe(arm, scale, out, seed)) for seed in seeds for arm in METHODS]


# --------------------------------------------------------------------------- running
def run_one(rec: dict[str, Any], out: Path, log: Any, print_only: bool, quiet: bool) -> None:
    """Train one run as a child process (skip it when finished, resume it when interrupted) and
    append its wall time and peak RSS (``os.wait4``'s ``ru_maxrss``) to ``DIR/costs/<run>.json``."""
    from mutualkd.runlog import dump_toml

    name = rec["run"]["name"]
    folder, path = out / name, out / "recipes" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(rec), encoding="utf-8")
    if (folder / "summary.json").exists():
        log(f"skip {name}: finished earlier")
        return
    ck = folder / "checkpoints"
    resume = ck.is_dir() and any(not p.name.startswith(".") for p in ck.iterdir())
    # run.resume = "auto" in the recipe also continues a run stopped before its first checkpoint
    cmd = fms.mutualkd() + (["run", "--resume", str(folder)] if resume else ["run", str(path)])
    if print_only:
        print(" ".join(cmd))
        return
    log(("resume " if resume else "start ") + name)
    if quiet:
        (out / "logs").mkdir(exist_ok=True)
    t0 = time.time()
    with open(out / "logs" / f"{name}.log", "a", encoding="utf-8") if quiet else nullcontext() as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT if quiet else None)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage, also with --jobs N threads
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    cost_file = out / "costs" / f"{name}.json"
    cost_file.parent.mkdir(exist_ok=True)
    segments = json.loads(cost_file.read_text(encoding="utf-8")) if cost_file.exists() else []
    segments.append({"wall_s": wall, "max_rss_mib": usage.ru_maxrss / 1024, "user_s": usage.ru_utime,
                     "sys_s": usage.ru_stime, "resumed": resume, "exit": proc.returncode})
    cost_file.write_text(json.dumps(segments, indent=1), encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}"
                           + (f"; see {out / 'logs' / (name + '.log')}" if quiet else ""))
    log(f"done {name} in {wall:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB")


# --------------------------------------------------------------------------- one run's figures
def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def run_figures(folder: Path) -> dict[str, Any]:
    """Top-1 of the reported output and of the peers' mean, at the last epoch and at the run's
    best epoch (the one its reported output chose: summary.json ``best_epoch``), and its costs."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    epochs: dict[int, dict[str, Any]] = {}
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line) if line.strip() else {}
        if r.get("kind") == "epoch" and "top1" in r:
            epochs[int(r["epoch"])] = r  # a resumed epoch's later record wins
    peers, best_output = summary["outputs"]["peers"], summary["best_output"]
    last, best = max(epochs), int(summary["best_epoch"])

    def top1(output: str, epoch: int) -> float:
        t = epochs[epoch]["top1"]
        return _mean([t[p] for p in peers]) if output == "peers" else float(t[output])

    scalars: dict[str, list[float]] = {}
    for r in epochs.values():
        for k, v in r.get("scalars", {}).items():
            scalars.setdefault(k, []).append(v)
    cost_file = folder.parent / "costs" / f"{folder.name}.json"
    segments = json.loads(cost_file.read_text(encoding="utf-8")) if cost_file.exists() else []
    return {
        "reported_output": best_output, "best_epoch": best, "epochs": last,
        "reported_last": top1(best_output, last), "reported_best": top1(best_output, best),
        "peers_last": top1("peers", last), "peers_best": top1("peers", best),
        "outputs_last": epochs[last]["top1"], "peers": peers,
        "train_s_per_epoch": _mean([r["train_seconds"] for r in epochs.values() if "train_seconds" in r]),
        "wall_s": sum(s["wall_s"] for s in segments) if segments else None,
        # CPU time barely moves when other work shares the cores; wall time does
        "cpu_s": sum(s["user_s"] + s["sys_s"] for s in segments) if segments else None,
        "max_rss_mib": max(s["max_rss_mib"] for s in segments) if segments else None,
        "scalars": {k: _mean(v) for k, v in scalars.items()},
    }


# --------------------------------------------------------------------------- analysis
FIGURES = ("reported_last", "reported_best", "peers_last", "peers_best")
TESTED = ("reported_last", "peers_last")  # the paired tests use the last epoch: no choice on the test split


def baseline_independent(arm: str) -> str:
    """The independent arm with the same batches (MCL and its baseline: class-balanced)."""
    return "independent_balanced" if arm == "mcl" else "independent"


def baselines(arm: str) -> tuple[str, ...]:
    """What an arm is compared with: KL-DML and independent training on the same batches."""
    if arm == "independent":
        return ()
    if arm in ("kl_dml", "independent_balanced"):
        return ("independent",)
    return ("kl_dml", baseline_independent(arm))


def collect(out: Path, scale: Scale, seeds: Sequence[int]) -> dict[str, Any]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, seed, rec in plan(scale, out, seeds):
        folder = out / rec["run"]["name"]
        if (folder / "summary.json").exists():
            runs.setdefault(arm, {})[seed] = run_figures(folder)
    per_seed = {f: {arm: {s: r[f] for s, r in v.items()} for arm, v in runs.items()} for f in FIGURES}
    arms: dict[str, Any] = {}
    for arm, v in runs.items():
        label, nets, r32, r110, src = METHODS[arm]
        walls = [r["wall_s"] for r in v.values() if r["wall_s"] is not None]
        cpus = [r["cpu_s"] for r in v.values() if r.get("cpu_s") is not None]
        rss = [r["max_rss_mib"] for r in v.values() if r["max_rss_mib"] is not None]
        scalars = sorted({k for r in v.values() for k in r["scalars"]})
        peer_names = {p for r in v.values() for p in r["peers"]}
        arms[arm] = {
            "label": label, "networks": nets, "reported_output": sorted({r["reported_output"] for r in v.values()}),
            "best_epochs": {s: r["best_epoch"] for s, r in v.items()},
            **{f: mean_interval(list(per_seed[f][arm].values())).as_dict() | {"per_seed": per_seed[f][arm]}
               for f in FIGURES},
            "cost": {"train_s_per_epoch": _mean([r["train_s_per_epoch"] for r in v.values()]),
                     "wall_min": _mean(walls) / 60 if walls else None, "cpu_min": _mean(cpus) / 60 if cpus else None,
                     "max_rss_mib": max(rss) if rss else None},
            "scalars": {k: _mean([r["scalars"][k] for r in v.values() if k in r["scalars"]]) for k in scalars},
            "literature_cifar100": {"resnet32": r32, "resnet110": r110, "source": src},
            "outputs_last": {s: r["outputs_last"] for s, r in v.items()},
            "other_outputs_last": {o: _mean([r["outputs_last"][o] for r in v.values() if o in r["outputs_last"]])
                                   for o in sorted({o for r in v.values() for o in r["outputs_last"]} - peer_names)},
        }
    tests = {f: [paired_test(f"{arm} beats {base}", arm, base, per_seed[f]).as_dict()
                 for arm in runs for base in baselines(arm) if base in runs] for f in TESTED}
    return {"scale": scale.name, "seeds": list(seeds), "model": scale.model, "epochs": scale.epochs,
            "arms": arms, "tests": tests, "min_effect_top1": MIN_EFFECT}


def _f(v: float | None, nd: int = 2) -> str:
    return "—" if v is None or v != v else f"{v:.{nd}f}"


def _iv(d: Mapping[str, Any]) -> str:
    return f"{_f(d['mean'])} [{_f(d['low'])}, {_f(d['high'])}]" if d["n"] > 1 else _f(d["mean"])


def markdown(res: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    lines = [f"# Online distillation methods under one protocol ({res['scale']} scale)", "",
             f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}",
             f"Wall time: {meta['wall_min']:.1f} min (this invocation)", "",
             f"Every arm: {res['model']}, {res['epochs']} epochs, seeds {', '.join(map(str, res['seeds']))}. Reported"
             " output: the one the method's authors report (summary.json `best_output`; `peers` = the mean over"
             " the peers); best = the epoch that output chose on the test split (optimistic, as in the papers).", "",
             "## Test top-1 (%): mean over seeds [95 % t interval]", "",
             "| method | networks | reported output | reported, last | reported, best | peers' mean, last |"
             " peers' mean, best | CIFAR-100 R-32 / R-110 (quoted) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for a in res["arms"].values():
        lit = a["literature_cifar100"]
        quoted = f"{_f(lit['resnet32'])} / {_f(lit['resnet110'])} ({lit['source']})" if lit["source"] else "—"
        lines.append(f"| {a['label']} | {a['networks']} | {', '.join(a['reported_output'])} |"
                     f" {_iv(a['reported_last'])} | {_iv(a['reported_best'])} | {_iv(a['peers_last'])} |"
                     f" {_iv(a['peers_best'])} | {quoted} |")
    lines += ["", "Other evaluated outputs at the last epoch (mean over seeds): "
              + "; ".join(f"{a['label']}: " + ", ".join(f"{o} {_f(v)}" for o, v in a["other_outputs_last"].items())
                          for a in res["arms"].values() if a["other_outputs_last"]) + "."]
    lines += ["", "Quoted numbers: CIFAR-100 with ResNet-32 / ResNet-110 from the papers (METHODS-ONLINE.md), not"
              " measured here; a different data set, network and budget, for orientation only."]
    for f, title in (("reported_last", "the reported output"), ("peers_last", "the peers' mean")):
        lines += ["", f"## Paired differences, {title} at the last epoch (points; \"method beats baseline\" is"
                  f" reproduced when the interval lies above 0, not reproduced when it lies below"
                  f" +{res['min_effect_top1']}, otherwise inconclusive)", "",
                  "| method | baseline | difference | 95 % interval | p | verdict |",
                  "| --- | --- | ---: | --- | ---: | --- |"]
        for t in res["tests"].get(f, []):
            iv = t["interval"]
            better, worse = res["arms"][t["better"]]["label"], res["arms"][t["worse"]]["label"]
            lines.append(f"| {better} | {worse} | {_f(iv['mean'])} | [{_f(iv['low'])}, {_f(iv['high'])}] |"
                         f" {_f(t['p'], 3)} | {t['verdict']} |")
    lines += ["", "## Cost (measured in this study)", "",
              "Training seconds per epoch: mean of metrics.jsonl `train_seconds` (evaluation excluded); run wall time:"
              " the `mutualkd run` child from start to exit, summed over resumed segments, mean over seeds (evaluation"
              " and start-up included); CPU time: the child's user + system time from `os.wait4`, the same span (one"
              " thread per run: the figure that other work on the machine disturbs least); peak RSS: the child's"
              " `ru_maxrss`, the largest over seeds and segments (Python, torch and the in-memory data set included;"
              " several runs at a time share the cores).",
              "",
              "| method | train s / epoch | run wall time (min) | run CPU time (min) | peak RSS (MiB) | logged scalars (mean) |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for a in res["arms"].values():
        c = a["cost"]
        sc = ", ".join(f"{k} {v:.3f}" for k, v in a["scalars"].items()) or "—"
        lines.append(f"| {a['label']} | {_f(c['train_s_per_epoch'])} | {_f(c['wall_min'], 1)} |"
                     f" {_f(c.get('cpu_min'), 1)} | {_f(c['max_rss_mib'], 0)} | {sc} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/online_study"))
    ap.add_argument("--scale", default="cpu", choices=["cpu", "paper", "tiny"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (tiny: 0 1)")
    ap.add_argument("--data-root", type=Path, default=None, help="CIFAR-100 folder for --scale paper (default ./data)")
    ap.add_argument("--print", dest="print_only", action="store_true", help="write the recipes, print the commands")
    ap.add_argument("--analyze-only", action="store_true", help="only analyse the runs that exist")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (2 on a quiet 2-core machine)")
    args = ap.parse_args(argv)
    scale = make_scale(args.scale, args.data_root)
    seeds = args.seeds or list(scale.seeds)
    if len(seeds) < 3 and args.scale != "tiny":
        print("note: the study's intervals and paired tests need at least 3 seeds", file=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per run: see docs/results.md
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
        line = f"[{time.strftime('%F %T')}] {msg} (load {' '.join(load)})"
        print(line, flush=True)
        with open(out / "online_study.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    t0 = time.time()
    if not args.analyze_only:
        todo = [rec for _, _, rec in plan(scale, out, seeds)]
        if args.jobs <= 1 or args.print_only:
            for rec in todo:
                run_one(rec, out, log, args.print_only, quiet=False)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for _ in pool.map(lambda r: run_one(r, out, log, False, quiet=True), todo):  # re-raises a failure
                    pass
    if args.print_only:
        print(f"recipes written to {out / 'recipes'}")
        return 0
    res = collect(out, scale, seeds)
    fms.write_study(out, "online_study", res, markdown, argv=argv, started=t0, log=log,
                    machine_extra=f", --jobs {args.jobs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

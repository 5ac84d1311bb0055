"""The method study of docs/results.md: every arm, every seed, the analysis, in one command.

    python scripts/fashion_mnist_study.py [--out DIR] [--scale cpu|paper|tiny] [--seeds 0 1 2]
                                          [--jobs N] [--print] [--analyze-only] [--probe-speed]

Arms (one run folder per arm and seed, ``DIR/<arm>-s<seed>``):

* ``independent``: two WRN-16-1 peers, each alone with cross-entropy (baseline of the
  mutual-learning claims and, at the cpu scale, the "student alone" of the KD claims);
* ``kl_dml``: Deep Mutual Learning between two WRN-16-1 (T = 1, weight 1, alternating);
* ``ie_dml``: IE-DML between two WRN-16-1 (L1, lambda 50 / 50, the four-step schedule);
* ``teacher``: one WRN-40-2 alone: at the cpu scale one teacher (seed 0) teaches the students of
  every seed, as a released pretrained teacher would; at the paper scale each seed has its own;
* ``student`` (paper scale only): one WRN-16-1 alone with the KD arms' schedule;
* ``hinton_kd``: WRN-40-2 -> WRN-16-1, Hinton KD (the mutualkd-hinton-kd example plugin);
* ``ie_kd``: WRN-40-2 -> WRN-16-1, IE-KD (L1, lambda 50 / 50).

Scales: ``cpu`` (the design of docs/results.md: Fashion-MNIST at 16 px, one class-stratified
5 000-image training subset shared by every arm and seed, the full 10 000-image test split,
40 epochs, cosine schedule), ``paper`` (the papers' budgets, for a GPU: CIFAR-100 or CIFAR-10 when present
under ``--data-root``, else Fashion-MNIST at full size), ``tiny`` (a minutes-long end-to-end
check of the pipeline; its numbers mean nothing). Runs go one after another (``--jobs N``: N at a
time; a student waits for its teacher); a finished run is skipped and an interrupted
one resumed, so the same command continues the study. At the end
the script runs ``mutualkd analyze`` on the KD students, compares the arms (scripts/study_stats.py)
and writes ``DIR/study.md`` and ``DIR/study.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_stats import MIN_EFFECT, mean_interval, paired_test  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
IE = {"inh_metric": "l1", "exp_metric": "l1", "lambda_inh": 50.0, "lambda_exp": 50.0, "rate": 0.5,
      "split": "natural", "ratio": 0.5}
STUDENT, TEACHER, PAIR = "cifar_wrn_16_1", "cifar_wrn_40_2", "cifar_wrn_16_1"


@dataclass
class Scale:
    """Data and budgets of one scale of the study."""

    name: str
    data: dict[str, Any]
    mutual_epochs: int
    kd_epochs: int
    teacher_epochs: int
    ae_epochs: int
    mutual_schedule: dict[str, Any]
    kd_schedule: dict[str, Any]
    mutual_batch: int
    kd_batch: int
    teacher_data: dict[str, Any] = field(default_factory=dict)
    separate_student: bool = False
    convergence_factor: int = 2  # the independent check run trains this many times longer
    teacher_seed: int | None = None  # one teacher, trained with this seed, for every seed; None: one per seed
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # the teacher network's own regularisation


def _cifar(root: Path) -> str | None:
    if (root / "cifar-100-python").is_dir():
        return "cifar100"
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    return None


CPU_SUBSET, CPU_EPOCHS = 5000, 40  # the cpu scale's budget: docs/results.md, "Budget, and why a subset"


def make_scale(name: str, data_root: Path | None) -> Scale:
    if name == "cpu":
        # One fixed subset (subset_seed): the seeds vary initialisation, data order and
        # augmentation, and the one teacher has seen exactly the students' training images.
        data = {"dataset": "fashion_mnist", "image_size": 16, "train_subset": CPU_SUBSET, "subset_seed": 0,
                "eval_batch_size": 1000}
        cosine = {"name": "cosine"}
        # The teacher's own evaluation uses 2000 test images (its full-split accuracy is
        # measured by `mutualkd analyze`): all 10 000 would add about half an epoch of its training.
        # The teacher's dropout (0.3 between the convs of every block, the WRN paper's): without it
        # WRN-40-2 overfits the 5 000 images and ends below its student alone (87.65 against
        # 88.00 %); with it, 88.47 % (docs/results.md, "A teacher that beats its student").
        return Scale("cpu", data, CPU_EPOCHS, CPU_EPOCHS, CPU_EPOCHS, 3, cosine, cosine, 128, 128,
                     teacher_data={"test_subset": 2000}, teacher_seed=0, teacher_kwargs={"drop_rate": 0.3})
    if name == "tiny":
        data = {"dataset": "fashion_mnist", "image_size": 16, "train_subset": 640, "subset_seed": 0,
                "test_subset": 500, "eval_batch_size": 500}
        cosine = {"name": "cosine"}
        return Scale("tiny", data, 1, 1, 1, 1, cosine, cosine, 64, 64, convergence_factor=2, teacher_seed=0)
    if name == "paper":
        root = data_root or REPO / "data"
        cifar = _cifar(root)
        data: dict[str, Any] = {"dataset": cifar, "root": str(root), "eval_batch_size": 1000} if cifar else \
            {"dataset": "fashion_mnist", "eval_batch_size": 1000}
        # DML paper (CIFAR-100): 200 epochs, batch 64, lr / 10 every 60 epochs. IE-KD authors:
        # 160 epochs, batch 128, lr x 0.1 at 80 and 120, autoencoder 30 epochs.
        return Scale("paper", data, 200, 160, 160, 30,
                     {"name": "multistep", "milestones": [60, 120, 180], "gamma": 0.1},
                     {"name": "multistep", "milestones": [80, 120], "gamma": 0.1}, 64, 128, separate_student=True)
    raise SystemExit(f"unknown scale {name!r}; use cpu, paper or tiny")


# --------------------------------------------------------------------------- recipes
def _recipe(scale: Scale, out: Path, name: str, seed: int, peers: Sequence[str], strategy: Mapping[str, Any],
            *, epochs: int, schedule: Mapping[str, Any], batch: int, extra_data: Mapping[str, Any] | None = None,
            peer_names: Sequence[str] | None = None) -> dict[str, Any]:
    data = dict(scale.data, batch_size=batch, augment=True, **(extra_data or {}))
    return {
        "run": {"name": name, "seed": seed, "epochs": epochs, "out_dir": str(out), "log_every": 50, "progress": False},
        "data": data,
        "peers": [{"model": m, **({"name": peer_names[i]} if peer_names else {})} for i, m in enumerate(peers)],
        "optimizer": dict(SGD),
        "scheduler": dict(schedule),
        "strategy": dict(strategy),
        "schedule": {"mode": "alternating"},
    }


def teacher_seed(scale: Scale, seed: int) -> int:
    """The seed of the teacher that teaches the students of ``seed``."""
    return seed if scale.teacher_seed is None else scale.teacher_seed


def teacher_arm(scale: Scale, out: Path, seed: int) -> dict[str, Any]:
    s = scale
    recipe = _recipe(s, out, f"teacher-s{seed}", seed, [TEACHER], {"name": "independent"}, epochs=s.teacher_epochs,
                     schedule=s.kd_schedule, batch=s.kd_batch, extra_data=s.teacher_data)
    if s.teacher_kwargs:
        recipe["peers"][0]["kwargs"] = dict(s.teacher_kwargs)
    return recipe


def arms(scale: Scale, out: Path, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The arms of one seed, in the order they must run (a teacher before its students).

    With a shared teacher (``scale.teacher_seed``) the teacher is an arm of its own seed only.
    """
    s = scale
    teacher = out / f"teacher-s{teacher_seed(s, seed)}"
    kd = dict(epochs=s.kd_epochs, schedule=s.kd_schedule, batch=s.kd_batch, peer_names=["student"])
    mutual = dict(epochs=s.mutual_epochs, schedule=s.mutual_schedule, batch=s.mutual_batch)
    plan: list[tuple[str, dict[str, Any]]] = [
        ("independent", _recipe(s, out, f"independent-s{seed}", seed, [PAIR, PAIR], {"name": "independent"}, **mutual)),
        ("kl_dml", _recipe(s, out, f"kl_dml-s{seed}", seed, [PAIR, PAIR],
                           {"name": "kl_dml", "temperature": 1.0, "weight": 1.0}, **mutual)),
        ("ie_dml", _recipe(s, out, f"ie_dml-s{seed}", seed, [PAIR, PAIR], {"name": "ie_dml", **IE}, **mutual)),
    ]
    if teacher_seed(s, seed) == seed:
        plan.append(("teacher", teacher_arm(s, out, seed)))
    if s.separate_student:
        plan.append(("student", _recipe(s, out, f"student-s{seed}", seed, [STUDENT], {"name": "independent"}, **kd)))
    plan += [
        ("hinton_kd", _recipe(s, out, f"hinton_kd-s{seed}", seed, [STUDENT],
                              {"name": "hinton_kd", "teacher": str(teacher), "teacher_peer": 0, "temperature": 4.0,
                               "alpha": 0.9}, **kd)),
        ("ie_kd", _recipe(s, out, f"ie_kd-s{seed}", seed, [STUDENT],
                          {"name": "ie_kd", "teacher": str(teacher), "teacher_peer": 0, "teacher_model": TEACHER,
                           "ae_epochs": s.ae_epochs, **IE}, **kd)),
    ]
    return plan


def chains(scale: Scale, out: Path, seeds: Sequence[int], convergence: bool) -> list[list[dict[str, Any]]]:
    """The runs as chains that must run in order; a chain's students may also wait for a
    teacher of another chain (see ``main``). Per-seed teachers: each seed's chain of teacher and
    students first, longest first, then the other arms. One shared teacher: the teacher, the
    convergence run, then seed by seed the mutual arms and the KD students (the students of the
    first seed start about when the teacher is done)."""
    kd_chain = {"teacher", "student", "hinton_kd", "ie_kd"}
    if scale.teacher_seed is not None:
        todo = [[teacher_arm(scale, out, scale.teacher_seed)]]
        if convergence:
            todo.append([convergence_arm(scale, out, seeds[0])[1]])
        for seed in seeds:
            plan = [(a, r) for a, r in arms(scale, out, seed) if a != "teacher"]
            todo += [[r] for a, r in plan if a not in kd_chain] + [[r] for a, r in plan if a in kd_chain]
        return todo
    first, rest = [], []
    for seed in seeds:
        plan = arms(scale, out, seed)
        first.append([r for a, r in plan if a in kd_chain])
        rest += [[r] for a, r in plan if a not in kd_chain]
    if convergence:
        rest.append([convergence_arm(scale, out, seeds[0])[1]])
    return first + rest


ARMS = ("independent", "kl_dml", "ie_dml", "teacher", "student", "hinton_kd", "ie_kd", "convergence")
KD_ARMS = ("student", "hinton_kd", "ie_kd")


def arm_of(run_name: str) -> str:
    """The arm of a run folder's name: ``ie_kd-s2`` -> ``ie_kd``, ``convergence-x2-s0`` -> ``convergence``."""
    return run_name.rsplit("-s", 1)[0].split("-x", 1)[0]


def select_arms(todo: list[list[dict[str, Any]]], wanted: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Keep the runs of the ``wanted`` arms, chains in order; the KD arms bring the teacher."""
    keep = set(wanted) | ({"teacher"} if set(wanted) & set(KD_ARMS) else set())
    chosen = [[r for r in chain if arm_of(r["run"]["name"]) in keep] for chain in todo]
    return [chain for chain in chosen if chain]


def convergence_arm(scale: Scale, out: Path, seed: int) -> tuple[str, dict[str, Any]]:
    """One WRN-16-1 alone with ``convergence_factor`` times the mutual arms' epochs."""
    e = scale.mutual_epochs * scale.convergence_factor
    return "convergence", _recipe(scale, out, f"convergence-x{scale.convergence_factor}-s{seed}", seed, [PAIR],
                                  {"name": "independent"}, epochs=e, schedule=scale.mutual_schedule,
                                  batch=scale.mutual_batch)


# --------------------------------------------------------------------------- sizing
def probe_speed(image_size: int = 16, batch: int = 128, channels: int = 1) -> dict[str, dict[str, float]]:
    """Images per second of one thread, per CPU second, for the study's two networks.

    Training (forward, backward, SGD step) and inference, on random batches: what the
    budget of docs/results.md is computed from. CPU seconds, so a shared machine slows the
    measurement down less than wall-clock time.
    """
    import timm
    import torch
    import torch.nn.functional as F

    import mutualkd.models  # noqa: F401  (registers the cifar_* models)

    torch.set_num_threads(1)
    x, y = torch.randn(batch, channels, image_size, image_size), torch.randint(0, 10, (batch,))
    speeds: dict[str, dict[str, float]] = {}
    for name, reps in ((PAIR, 15), (TEACHER, 6)):
        model = timm.create_model(name, num_classes=10, in_chans=channels)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for mode in ("train", "infer"):
            for i in range(reps + 2):  # two warm-up batches
                if i == 2:
                    c0 = time.process_time()
                if mode == "train":
                    loss = F.cross_entropy(model.train()(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                else:
                    with torch.no_grad():
                        model.eval()(x)
            speeds.setdefault(name, {})[mode] = batch * reps / (time.process_time() - c0)
    return speeds


# --------------------------------------------------------------------------- running
def mutualkd() -> list[str]:
    exe = Path(sys.executable).with_name("mutualkd")
    return [str(exe)] if exe.exists() else [shutil.which("mutualkd") or "mutualkd"]


def run_one(recipe: dict[str, Any], out: Path, log: Any, print_only: bool, quiet: bool = False) -> float:
    """Train one run (skip it when finished, resume it when interrupted); returns seconds.

    ``quiet``: the run's console output goes to ``DIR/logs/<run>.log`` (for parallel runs).
    """
    from mutualkd.runlog import dump_toml

    folder = out / recipe["run"]["name"]
    path = out / "recipes" / f"{recipe['run']['name']}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(recipe), encoding="utf-8")
    if (folder / "summary.json").exists():
        log(f"skip {folder.name}: finished earlier")
        return 0.0
    cmd = mutualkd() + (["run", "--resume", str(folder)] if (folder / "checkpoints").is_dir() else ["run", str(path)])
    if print_only:
        print(" ".join(cmd))
        return 0.0
    log(f"start {folder.name}")
    t0 = time.time()
    if quiet:
        (out / "logs").mkdir(exist_ok=True)
        with open(out / "logs" / f"{folder.name}.log", "a", encoding="utf-8") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    else:
        subprocess.run(cmd, check=True)
    log(f"done {folder.name} in {time.time() - t0:.0f} s")
    return time.time() - t0


def top1(folder: Path) -> dict[str, float]:
    """Final test top-1 of every network of a finished run (summary.json)."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return {k: float(v["final"]) for k, v in summary["top1"].items() if k != "ensemble"}


def analyze(folder: Path) -> dict[str, Any]:
    res = subprocess.run(mutualkd() + ["analyze", str(folder), "--json"], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- analysis
CLAIMS = [
    # (claim, better, worse, source)
    ("mutual learning beats independent training", "kl_dml", "independent", "DML paper (Zhang et al. 2018)"),
    ("IE-DML beats KL-DML", "ie_dml", "kl_dml", "IE-KD paper (Huang et al. 2021)"),
    ("IE-DML beats independent training", "ie_dml", "independent", "IE-KD paper (Huang et al. 2021)"),
    ("Hinton KD improves the student", "hinton_kd", "student", "Hinton et al. 2015"),
    ("IE-KD improves the student", "ie_kd", "student", "IE-KD paper (Huang et al. 2021)"),
    ("IE-KD beats Hinton KD", "ie_kd", "hinton_kd", "IE-KD paper (Huang et al. 2021)"),
]
CKA_MIN_EFFECT = 0.02  # smallest CKA reduction the study treats as a change of the features


def collect(out: Path, scale: Scale, seeds: Sequence[int]) -> dict[str, Any]:
    per_seed: dict[str, dict[int, float]] = {}
    networks: dict[str, dict[int, dict[str, float]]] = {}
    cka: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in seeds:
        for arm, recipe in arms(scale, out, seed):
            folder = out / recipe["run"]["name"]
            if not (folder / "summary.json").exists():
                continue
            acc = top1(folder)
            networks.setdefault(arm, {})[seed] = acc
            per_seed.setdefault(arm, {})[seed] = sum(acc.values()) / len(acc)
            if arm in ("hinton_kd", "ie_kd"):
                cka.setdefault(arm, {})[seed] = analyze(folder)
    if scale.teacher_seed is not None and scale.teacher_seed not in seeds:
        folder = out / f"teacher-s{scale.teacher_seed}"
        if (folder / "summary.json").exists():
            per_seed["teacher"] = {scale.teacher_seed: top1(folder)["peer0"]}
    if not scale.separate_student and "independent" in per_seed:
        per_seed["student"] = dict(per_seed["independent"])  # same network, data and schedule
    arms_iv = {arm: mean_interval(list(v.values())).as_dict() | {"per_seed": v} for arm, v in per_seed.items()}
    claims = [paired_test(c, b, w, per_seed).as_dict() | {"source": src} for c, b, w, src in CLAIMS]
    cka_seed = {arm: {s: r["cka_maps"] for s, r in v.items()} for arm, v in cka.items()}
    cka_seed_db = {arm: {s: r["cka_maps_debiased"] for s, r in v.items()} for arm, v in cka.items()}
    feature_claims = [
        paired_test("IE-KD's student features are less similar to the teacher's than KD's (linear CKA, maps)",
                    "ie_kd", "hinton_kd", cka_seed, min_effect=CKA_MIN_EFFECT, higher_is_better=False).as_dict(),
        paired_test("the same, debiased CKA", "ie_kd", "hinton_kd", cka_seed_db, min_effect=CKA_MIN_EFFECT,
                    higher_is_better=False).as_dict(),
    ]
    conv = {}
    teacher = teacher_check(per_seed, arms_iv, cka)
    c_arm, c_recipe = convergence_arm(scale, out, seeds[0])
    c_folder = out / c_recipe["run"]["name"]
    if (c_folder / "summary.json").exists() and seeds[0] in networks.get("independent", {}):
        longer = top1(c_folder)["peer0"]
        base = networks["independent"][seeds[0]]
        conv = {"seed": seeds[0], "epochs": scale.mutual_epochs, "longer_epochs": c_recipe["run"]["epochs"],
                "independent_peers": base, "longer_run": longer,
                "gain_of_longer_training": longer - sum(base.values()) / len(base),
                "independent_seed_sd": arms_iv.get("independent", {}).get("sd")}
        # converged: twice the budget gains less than the smallest effect a claim counts
        conv["converged"] = conv["gain_of_longer_training"] < MIN_EFFECT
    return {"scale": scale.name, "seeds": list(seeds), "arms": arms_iv, "student_is_independent": not scale.separate_student, "networks": networks, "claims": claims,
            "feature_similarity": {"per_run": cka, "claims": feature_claims}, "convergence": conv,
            "teacher_check": teacher,
            "min_effect_top1": MIN_EFFECT, "min_effect_cka": CKA_MIN_EFFECT}


def teacher_check(per_seed: Mapping[str, Mapping[int, float]], arms_iv: Mapping[str, Mapping[str, Any]],
                  cka: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Does the teacher beat the student alone by more than the student's seed spread?

    The teacher's figure is its top-1 on the full test split (``mutualkd analyze`` of a KD
    student), else its own per-epoch evaluation. The spread is the range of the student-alone
    arm over seeds (best seed minus worst); the check passes when the teacher's margin over the
    arm's mean is larger, so the teacher is also above the student's best seed. Whether the
    teacher lies above the upper end of the arm's 95 % interval (a stricter test) is reported too.
    """
    student = arms_iv.get("student")
    full = [r["teacher_top1"] for runs in cka.values() for r in runs.values() if r.get("teacher_top1") is not None]
    own = list(per_seed.get("teacher", {}).values())
    if not student or not (full or own):
        return {}
    seeds = list(per_seed["student"].values())
    top = sum(full) / len(full) if full else sum(own) / len(own)
    spread = max(seeds) - min(seeds)
    return {"teacher_top1": top, "on": "full test split" if full else "its own evaluation",
            "student_alone": student["mean"], "student_sd": student["sd"], "student_high": student["high"],
            "margin": top - student["mean"], "spread": spread, "passed": bool(top - student["mean"] > spread),
            "above_interval": bool(top > student["high"])}


def _f(v: float | None, nd: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def markdown(res: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    lines = [f"# Method study ({res['scale']} scale)", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}", f"Wall time: {meta['wall_min']:.1f} min (this invocation)", "",
             "## Test top-1 (%) per arm: mean over seeds, 95 % t interval", "",
             "| arm | seeds | mean | 95 % interval | sd | per seed |", "| --- | ---: | ---: | --- | ---: | --- |"]
    for arm, iv in res["arms"].items():
        per = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(iv["per_seed"].items()))
        if arm == "student" and res["student_is_independent"]:
            arm = "student (= independent)"
        lines.append(f"| {arm} | {iv['n']} | {_f(iv['mean'])} | [{_f(iv['low'])}, {_f(iv['high'])}] | {_f(iv['sd'])} | {per} |")
    lines += ["", f"## Claims: paired over seeds (verdict: interval above 0 = reproduced; below +{res['min_effect_top1']}"
              " points = not reproduced; otherwise inconclusive)", "",
              "| claim | source | difference (points) | 95 % interval | t | p | verdict |",
              "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for c in res["claims"]:
        iv = c["interval"]
        verdict = c["verdict"] if c["seeds"] else "not run (an arm has no finished run)"
        lines.append(f"| {c['claim']} ({c['better']} - {c['worse']}) | {c['source']} | {_f(iv['mean'])} |"
                     f" [{_f(iv['low'])}, {_f(iv['high'])}] | {_f(c['t'])} | {_f(c['p'], 3)} | {verdict} |")
    lines += ["", "## Feature similarity of teacher and student (linear CKA, test split)", "",
              "| arm | seed | student top-1 | teacher top-1 | CKA maps | debiased | CKA pooled | debiased |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, runs in res["feature_similarity"]["per_run"].items():
        for s, r in sorted(runs.items()):
            lines.append(f"| {arm} | {s} | {_f(r['student_top1'])} | {_f(r['teacher_top1'])} | {_f(r['cka_maps'], 4)} |"
                         f" {_f(r['cka_maps_debiased'], 4)} | {_f(r['cka_pooled'], 4)} | {_f(r['cka_pooled_debiased'], 4)} |")
    lines += ["", "| claim | difference (CKA) | 95 % interval | p | verdict |", "| --- | ---: | --- | ---: | --- |"]
    for c in res["feature_similarity"]["claims"]:
        iv = c["interval"]
        lines.append(f"| {c['claim']} | {_f(iv['mean'], 4)} | [{_f(iv['low'], 4)}, {_f(iv['high'], 4)}] | {_f(c['p'], 3)} |"
                     f" {c['verdict']} |")
    check = res.get("teacher_check")
    if check:
        lines += ["", "## Teacher check", "",
                  f"Teacher {check['teacher_top1']:.2f} % ({check['on']}) against the student alone"
                  f" {check['student_alone']:.2f} % (sd {check['student_sd']:.2f}): margin {check['margin']:+.2f}"
                  f" points, seed spread (best seed - worst) {check['spread']:.2f}: "
                  + ("passed" if check["passed"] else "failed, so the KD claims do not test a better teacher")
                  + f". The teacher is {'above' if check['above_interval'] else 'inside'} the student-alone arm's"
                  f" 95 % interval (upper end {check['student_high']:.2f})."]
    conv = res["convergence"]
    if conv:
        lines += ["", "## Convergence of independent training", "",
                  f"Seed {conv['seed']}: {conv['epochs']} epochs gave peers {conv['independent_peers']}; one network"
                  f" trained {conv['longer_epochs']} epochs reached {conv['longer_run']:.2f} % (gain"
                  f" {conv['gain_of_longer_training']:+.2f} points; seed sd of the independent arm"
                  f" {_f(conv['independent_seed_sd'])}): "
                  + ("converged" if conv["converged"] else "not converged")
                  + f" (converged = a gain below {res['min_effect_top1']} points, the smallest effect a claim counts)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/method_study"))
    ap.add_argument("--scale", default="cpu", choices=["cpu", "paper", "tiny"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root", type=Path, default=None, help="CIFAR folder for --scale paper (default ./data)")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--analyze-only", action="store_true", help="only analyse the runs that exist")
    ap.add_argument("--no-convergence-check", action="store_true", help="skip the longer independent run")
    ap.add_argument("--probe-speed", action="store_true", help="print one thread's images/s per network and exit")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (2 on a quiet 2-core machine)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                    help="train only these arms (a KD arm brings its teacher); the analysis reads every finished run")
    args = ap.parse_args(argv)
    if args.probe_speed:
        for name, v in probe_speed().items():
            print(f"{name}: train {v['train']:.0f} images/s, inference {v['infer']:.0f} images/s (per CPU second)")
        return 0
    if len(args.seeds) < 3 and args.scale != "tiny":
        print("note: the study's intervals and paired tests need at least 3 seeds", file=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per run: see docs/results.md
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scale = make_scale(args.scale, args.data_root)
    log_file = out / "study.log"

    def log(msg: str) -> None:
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
        line = f"[{time.strftime('%F %T')}] {msg} (load {' '.join(load)})"
        print(line, flush=True)
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    t0 = time.time()
    if not args.analyze_only:
        todo = chains(scale, out, args.seeds, not args.no_convergence_check)
        if args.arms:
            todo = select_arms(todo, args.arms)
        if args.jobs <= 1 or args.print_only:
            for chain in todo:
                for recipe in chain:
                    run_one(recipe, out, log, args.print_only)
        else:
            from concurrent.futures import ThreadPoolExecutor
            import threading

            finished = {r["run"]["name"]: threading.Event() for chain in todo for r in chain}

            def run_chain(chain: list[dict[str, Any]]) -> None:
                for recipe in chain:
                    try:
                        teacher = recipe["strategy"].get("teacher")
                        if teacher and Path(teacher).name in finished:
                            finished[Path(teacher).name].wait()
                            if not (Path(teacher) / "summary.json").exists():
                                raise RuntimeError(f"{recipe['run']['name']}: its teacher {teacher} did not finish")
                        run_one(recipe, out, log, False, quiet=True)
                    finally:
                        finished[recipe["run"]["name"]].set()

            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for _ in pool.map(run_chain, todo):  # re-raises the first failure
                    pass
    if args.print_only:
        return 0
    res = collect(out, scale, args.seeds)
    write_study(out, "study", res, markdown, argv=argv, started=t0, log=log)
    return 0


def write_study(out: Path, stem: str, res: dict[str, Any], render: Callable[[dict[str, Any], dict[str, Any]], str], *,
                argv: Sequence[str] | None, started: float, log: Callable[[str], None], machine_extra: str = "") -> None:
    """Write ``<stem>.json`` (results plus the command, machine and wall time) and ``<stem>.md``, print the table."""
    cpu = platform.processor() or platform.machine()
    meta = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
            "machine": f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, OMP_NUM_THREADS="
                       f"{os.environ.get('OMP_NUM_THREADS')}{machine_extra}",
            "wall_min": (time.time() - started) / 60}
    (out / f"{stem}.json").write_text(json.dumps(res | {"meta": meta}, indent=2, default=str), encoding="utf-8")
    text = render(res, meta)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
    log(f"study written to {out / f'{stem}.md'}")


if __name__ == "__main__":
    raise SystemExit(main())

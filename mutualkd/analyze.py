"""``mutualkd analyze``: how similar a finished run's student features are to its teacher's.

IE-KD's motivation (Huang et al., CVPR 2021) is that a student trained by plain knowledge
distillation learns features too similar to its teacher's, and that IE-KD's exploration part
makes it learn new ones. This module measures that directly: linear CKA (Kornblith et al.,
"Similarity of Neural Network Representations Revisited", ICML 2019) between the teacher's and
the student's feature maps (the output of ``forward_features``, as the IE strategies use them)
over the whole test split of the run's recipe.

Four numbers per pair, each over all ``n`` test images (rows: images):

* ``cka_maps``: linear CKA of the flattened feature maps (``C * H * W`` columns each);
* ``cka_maps_debiased``: the same with the unbiased HSIC estimator (Song et al. 2012), which
  removes the upward bias that biased CKA has when ``n`` is not much larger than the number
  of columns;
* ``cka_pooled`` / ``cka_pooled_debiased``: the same on the globally average-pooled maps
  (``C`` columns: what the classifier head sees).

The teacher is the one named in the run's ``[strategy]`` table (``teacher``, ``teacher_peer``:
``ie_kd``, ``hinton_kd``) unless given explicitly, so the same call compares two peers of a
mutual-learning run. Computed in float64, on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mutualkd.errors import UserError

__all__ = ["PairSimilarity", "linear_cka", "analyze_run", "MAX_MATRIX_ENTRIES"]

#: Largest float64 matrix (entries) the exact CKA may build: 2**27 entries are 1 GiB.
MAX_MATRIX_ENTRIES = 2**27


@dataclass(frozen=True)
class PairSimilarity:
    """The similarity of one student to one teacher on a run's test split."""

    run: str
    student: str
    student_model: str
    teacher: str
    teacher_peer: str
    teacher_model: str
    checkpoint: str
    samples: int
    student_top1: float
    teacher_top1: float
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    cka_maps: float
    cka_maps_debiased: float
    cka_pooled: float
    cka_pooled_debiased: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["student_shape"], d["teacher_shape"] = list(self.student_shape), list(self.teacher_shape)
        return d


# --------------------------------------------------------------------------- linear CKA
def _gram_hsic(x: Tensor, y: Tensor, debiased: bool) -> tuple[float, float, float]:
    """``(<K, L>, <K, K>, <L, L>)`` of the centred (or U-centred) Gram matrices, ``[n, n]`` form."""
    k, l = x @ x.T, y @ y.T
    if debiased:
        n = k.shape[0]
        off = 1.0 - torch.eye(n, dtype=k.dtype)

        def u_centre(g: Tensor) -> Tensor:
            g = g * off
            row = g.sum(dim=0) / (n - 2)
            return (g - row[:, None] - row[None, :] + g.sum() / ((n - 1) * (n - 2))) * off

        k, l = u_centre(k), u_centre(l)
    return float((k * l).sum()), float((k * k).sum()), float((l * l).sum())


def _feature_hsic(x: Tensor, y: Tensor, debiased: bool) -> tuple[float, float, float]:
    """The same quantities from the feature-space products ``X^T Y`` (Kornblith et al.'s form)."""
    xy = float((x.T @ y).pow(2).sum())
    xx = float((x.T @ x).pow(2).sum())
    yy = float((y.T @ y).pow(2).sum())
    if not debiased:
        return xy, xx, yy
    n = x.shape[0]
    rx, ry = x.pow(2).sum(dim=1), y.pow(2).sum(dim=1)  # squared row norms
    sx, sy = float(rx.sum()), float(ry.sum())

    def unbiased(prod: float, ra: Tensor, rb: Tensor, sa: float, sb: float) -> float:
        # tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1 for column-centred features
        return prod - n / (n - 2) * float(ra @ rb) + sa * sb / ((n - 1) * (n - 2))

    return unbiased(xy, rx, ry, sx, sy), unbiased(xx, rx, rx, sx, sx), unbiased(yy, ry, ry, sy, sy)


def linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False) -> float:
    """Linear CKA between ``x`` ``[n, p]`` and ``y`` ``[n, q]`` (rows: the same samples), float64.

    ``<K, L> / (||K|| ||L||)`` for the centred Gram matrices ``K = X X^T``, ``L = Y Y^T``
    (biased HSIC), or with the unbiased HSIC of Song et al. 2012 when ``debiased`` (then
    ``n >= 4``; the value can be negative). The ``[n, n]`` or the feature-space form is
    used, whichever has the smaller matrices; both give the same value.

    Raises:
        ValueError: different numbers of rows, fewer than 2 (4 when debiased), a constant
        input (CKA undefined), or matrices above :data:`MAX_MATRIX_ENTRIES`.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [n, p] and [n, q] with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka needs at least {4 if debiased else 2} samples, got {n}")
    gram, feature = 2 * n * n, p * p + q * q + p * q
    if min(gram, feature) > MAX_MATRIX_ENTRIES:
        raise ValueError(
            f"exact CKA of {n} samples with {p} and {q} features needs matrices of {min(gram, feature)} entries"
            f" (more than {MAX_MATRIX_ENTRIES}); use fewer samples (--max-samples)"
        )
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    xy, xx, yy = (_gram_hsic if gram <= feature else _feature_hsic)(x, y, debiased)
    if xx <= 0 or yy <= 0:
        raise ValueError("linear_cka: one input has no variance over the samples (CKA is undefined)")
    return xy / (xx * yy) ** 0.5


# --------------------------------------------------------------------------- one run
def _strategy_teacher(recipe: Any, run_dir: Path) -> tuple[str, str | int]:
    """The teacher the run's strategy names, from its parameters as the recipe's load resolved them."""
    from mutualkd.config import resolve_params

    _, resolved = resolve_params(recipe, str(run_dir / "recipe.toml"))
    params = resolved.model_dump()
    if params.get("teacher") is None:
        raise UserError(
            f"the run in {run_dir} has no teacher: its strategy '{recipe.strategy.name}' names none",
            hint="give one with --teacher RUN_OR_CHECKPOINT_DIR [--teacher-peer NAME]; for two peers of one"
            " run: --teacher RUN_DIR --teacher-peer peer1 --peer peer0",
        )
    return str(params["teacher"]), params.get("teacher_peer", 0)


def _test_split(run_recipe: Any, run_dir: Path) -> tuple[Any, Any]:
    """The run's test split and data set info, resolved as the run's device pipeline resolves them."""
    from mutualkd.data.pipeline import plan_device
    from mutualkd.errors import DataError

    peers = dict(zip(run_recipe.network_names(), (pc.model for pc in run_recipe.peers)))
    try:
        plan = plan_device(run_recipe.data, seed=run_recipe.run.seed, peers=peers)
    except DataError as e:
        raise UserError(f"{run_dir}: the run's test split cannot be loaded: {e.message}", hint=e.hint) from None
    return plan.test, plan.info


def _batches(run_recipe: Any, test: Any, info: Any, max_samples: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    from mutualkd.data import BatchLoader, Split

    if max_samples is not None and max_samples < test.labels.shape[0]:
        test = Split(test.images[:max_samples], test.labels[:max_samples])
    loader = BatchLoader(test, info, batch_size=run_recipe.data.eval_batch_size, device="cpu", train=False,
                         augment=False, seed=run_recipe.run.seed)
    loader.set_epoch(0)
    yield from loader


def analyze_run(
    run_dir: str | Path,
    *,
    peer: str | int = 0,
    teacher: str | Path | None = None,
    teacher_peer: str | int | None = None,
    checkpoint: str | Path | None = None,
    max_samples: int | None = None,
) -> PairSimilarity:
    """Linear CKA between a run's student ``peer`` and its teacher on the run's test split.

    ``run_dir`` is a run folder (its ``recipe.toml`` gives the data and, unless ``teacher`` is
    given, the teacher); the student's weights come from ``checkpoint`` (a checkpoint folder)
    or the run's latest complete checkpoint (the final one of a finished run). ``max_samples``
    keeps the first that many test images.

    Raises:
        UserError: the folder is not a run, it names no teacher and none is given, or a
        checkpoint does not fit.
    """
    from mutualkd.checkpoint import resolve_checkpoint
    from mutualkd.config import load_recipe
    from mutualkd.peers import PeerModule
    from mutualkd.weights import load_run_peer

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{run_dir} is not a run folder: it has no recipe.toml",
                        hint="name the folder of a finished mutualkd run (out_dir/name)")
    recipe = load_recipe(run_dir / "recipe.toml")
    if teacher is None:
        teacher, default_peer = _strategy_teacher(recipe, run_dir)
        teacher_peer = default_peer if teacher_peer is None else teacher_peer
    teacher_peer = 0 if teacher_peer is None else teacher_peer
    names = recipe.peer_names()
    if isinstance(peer, int) and not 0 <= peer < len(names):
        raise UserError(f"the run in {run_dir} has {len(names)} peer(s), no peer {peer}", hint=f"peers: {', '.join(names)}")
    student_name = names[peer] if isinstance(peer, int) else str(peer)
    ckpt = resolve_checkpoint(Path(checkpoint) if checkpoint is not None else run_dir, where=str(run_dir))

    test, info = _test_split(recipe, run_dir)
    s = load_run_peer(ckpt, student_name, num_classes=info.num_classes, in_chans=info.in_chans,
                      where=f"{run_dir} (student)")
    t = load_run_peer(teacher, teacher_peer, num_classes=info.num_classes, in_chans=info.in_chans,
                      where=f"{run_dir} (teacher {teacher})")
    s_arch, t_arch = s.model_name, t.model_name
    student, teacher_net = (PeerModule(net.model.requires_grad_(False), net.model_name).eval() for net in (s, t))

    maps_s, maps_t, correct_s, correct_t, n = [], [], 0, 0, 0
    with torch.no_grad():
        for x, y in _batches(recipe, test, info, max_samples):
            fs, zs = student(x)
            ft, zt = teacher_net(x)
            maps_s.append(fs.float())
            maps_t.append(ft.float())
            correct_s += int((zs.argmax(1) == y).sum())
            correct_t += int((zt.argmax(1) == y).sum())
            n += int(y.shape[0])
    fs_all, ft_all = torch.cat(maps_s), torch.cat(maps_t)
    flat_s, flat_t = fs_all.flatten(1), ft_all.flatten(1)
    pool_s, pool_t = fs_all.mean(dim=(2, 3)), ft_all.mean(dim=(2, 3))
    try:
        values = [linear_cka(flat_s, flat_t), linear_cka(flat_s, flat_t, debiased=True),
                  linear_cka(pool_s, pool_t), linear_cka(pool_s, pool_t, debiased=True)]
    except ValueError as e:
        raise UserError(f"{run_dir}: {e}", hint="pass --max-samples N to use the first N test images") from None
    return PairSimilarity(
        run=str(run_dir), student=student_name, student_model=s_arch, teacher=str(teacher),
        teacher_peer=str(teacher_peer), teacher_model=t_arch, checkpoint=str(ckpt), samples=n,
        student_top1=100.0 * correct_s / n, teacher_top1=100.0 * correct_t / n,
        student_shape=tuple(fs_all.shape[1:]), teacher_shape=tuple(ft_all.shape[1:]),
        cka_maps=values[0], cka_maps_debiased=values[1], cka_pooled=values[2], cka_pooled_debiased=values[3],
    )

"""``switokd``: Switchable Online Knowledge Distillation (Qian, Wang, Li, Ge, Zhang and Ji, ECCV 2022).

Reference code: github.com/hfutqian/SwitOKD @a3f9623. A larger "teacher" and a student, both
trained online. On every batch the distance between their predictions decides the mode: in
expert mode only the student learns (from the teacher); in learning mode both learn from each
other as in Deep Mutual Learning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kd_div


def switch_statistics(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """SwitOKD's per-batch switching statistics, from detached predictions at T = 1.

    ``student_logits``, ``teacher_logits``: ``[B, classes]``; ``labels``: ``[B]`` class indices
    (one-hot encoded) or ``[B, classes]`` probabilities, used as the target distribution as they
    are. With ``p_s``, ``p_t`` the softmax probabilities and ``y`` the target, batch means of L1
    distances:

    * ``d_s = mean_b ||p_s - y||_1``, ``d_t = mean_b ||p_t - y||_1``, ``G = mean_b ||p_s - p_t||_1``;
    * ``eps = exp(-d_t / (d_t + d_s))``, ``delta = d_s - eps * d_t`` (the adaptive threshold);
    * ``expert = (G > delta) & (d_t < d_s)``: a 0-d bool tensor, True for expert mode.

    Returns the 0-d float32 tensors ``d_s``, ``d_t``, ``G``, ``eps``, ``delta`` and ``expert``, none of
    them attached to a graph.
    """
    with torch.no_grad():
        p_s = F.softmax(student_logits.detach().float(), dim=1)
        p_t = F.softmax(teacher_logits.detach().float(), dim=1)
        if labels.dim() == 2 and labels.is_floating_point():
            y = labels.float()
        else:
            y = F.one_hot(labels, p_s.shape[1]).float()
        d_s = (p_s - y).abs().sum(dim=1).mean()
        d_t = (p_t - y).abs().sum(dim=1).mean()
        gap = (p_s - p_t).abs().sum(dim=1).mean()
        eps = torch.exp(-d_t / (d_t + d_s))
        delta = d_s - eps * d_t
        expert = (gap > delta) & (d_t < d_s)
    return {"d_s": d_s, "d_t": d_t, "G": gap, "eps": eps, "delta": delta, "expert": expert}


def switokd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, expert: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """SwitOKD's loss terms for one batch, in the mode chosen by :func:`switch_statistics`.

    ``student_logits``, ``teacher_logits``: ``[B, classes]``; ``labels``: ``[B]`` class indices (or
    ``[B, classes]`` probabilities). The KL is batch-mean at T = 1, with no ``T^2`` factor, and its
    target is detached inside.

    * ``expert=True``: ``({"ce": CE(z_s), "kl": KL(sg p_t || p_s)}, None)``; the teacher is not updated.
    * ``expert=False`` (learning mode, DML): the student as above, and the teacher
      ``{"ce": CE(z_t), "kl": KL(sg p_s || p_t)}``.
    """
    student = {
        "ce": F.cross_entropy(student_logits.float(), labels),
        "kl": kd_div(student_logits, teacher_logits.detach(), 1.0),
    }
    if expert:
        return student, None
    teacher = {
        "ce": F.cross_entropy(teacher_logits.float(), labels),
        "kl": kd_div(teacher_logits, student_logits.detach(), 1.0),
    }
    return student, teacher


# --------------------------------------------------------------------------- the strategy


class SwitOKDParams(StrategyParams):
    pass


class SwitOKD(Strategy[SwitOKDParams]):
    """SwitOKD: per batch, the student alone learns from the teacher (expert) or both learn (Qian et al., ECCV 2022).

    Two whole networks: the first ``[[peers]]`` table is the (larger) teacher, the second the
    student; each has its own optimizer settings (``[peers.optimizer]``; the authors: teacher
    lr 0.1, student lr 0.01). Per batch, from detached statistics at T = 1 (``d_s``, ``d_t``,
    ``G``, ``delta = d_s - exp(-d_t / (d_t + d_s)) d_t``): **expert mode** when ``G > delta``
    and ``d_t < d_s``: only the student steps, ``CE + KL(sg p_t || p_s)``, the teacher is left
    untouched (its optimizer state too); otherwise **learning mode**: both step, DML with KL.
    The mode is logged per batch as the scalar ``expert`` (1 or 0): its epoch mean in
    metrics.jsonl is the share of expert batches.
    """

    min_peers = 2
    max_peers = 2

    def steps(self) -> Sequence[Step]:
        return [Step("all", tuple(self.networks))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        teacher, student = self.peers
        z_t, z_s = ctx.output(teacher).logits, ctx.output(student).logits
        stats = switch_statistics(z_s, z_t, ctx.labels)
        expert = bool(stats["expert"])  # one host sync per batch: the mode decides which units step
        ctx.log("expert", float(expert))
        s_terms, t_terms = switokd_terms(z_s, z_t, ctx.labels, expert=expert)
        if t_terms is None:
            ctx.skip_update(self.unit_of(teacher))
            return {student: s_terms}
        return {student: s_terms, teacher: t_terms}

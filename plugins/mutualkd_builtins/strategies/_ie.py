"""What IE-KD and IE-DML share: parameters, the IE loss terms, and the module set-up.

Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration
Framework", CVPR 2021. A teacher's feature map f_T is compressed into a factor
F_T = Enc_T(f_T) by a factor autoencoder (paraphraser) trained to reconstruct f_T. The
student's feature map is split along channels into an inheritance part and an
exploration part, each encoded into the teacher's factor space; the student minimises

    CE + lambda_inh * d_inh(F_inh, F_T) - lambda_exp * d_exp(F_exp, F_T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import OptimizerConfig, SchedulerConfig, SetupContext, StrategyParams
from mutualkd_builtins.factor import InheritExploreEncoders, Paraphraser

__all__ = [
    "IEParams",
    "ie_terms",
    "reconstruction_term",
    "teacher_factor",
    "match_grid",
    "resolve_metrics",
    "make_paraphraser",
    "make_encoders",
    "null_cka",
    "cka_range_note",
    "warn_cka_range",
]

Metric = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- loss terms
def ie_terms(
    logits: Tensor,
    labels: Tensor,
    f_inh: Tensor,
    f_exp: Tensor,
    teacher_factor: Tensor,
    *,
    d_inh: Metric,
    d_exp: Metric,
    lambda_inh: float,
    lambda_exp: float,
) -> dict[str, Tensor]:
    """The IE loss terms of a student: ``ce``, ``inh`` (= +lambda d) and ``exp`` (= -lambda d).

    ``teacher_factor`` is a constant (detached here).
    """
    target = teacher_factor.detach().float()
    return {
        "ce": F.cross_entropy(logits.float(), labels),
        "inh": lambda_inh * d_inh(f_inh.float(), target),
        "exp": -lambda_exp * d_exp(f_exp.float(), target),
    }


def reconstruction_term(ae: nn.Module, features: Tensor) -> Tensor:
    """L_rec of a factor autoencoder on ``features``, which are detached: the backbone is not
    trained by this loss."""
    f = features.detach()
    _, recon = ae(f)
    return ae.reconstruction_loss(f, recon)


def teacher_factor(ae: nn.Module, features: Tensor) -> Tensor:
    """F_T = Enc_T(f_T), with no gradient into the teacher or its autoencoder.

    Only the encoder runs (the reconstruction is not needed here).
    """
    with torch.no_grad():
        return ae.encode(features.detach())


def match_grid(f_student: Tensor, teacher_factor: Tensor) -> Tensor:
    """Pool the student's map to the teacher factor's spatial size when they differ."""
    if f_student.shape[-2:] != teacher_factor.shape[-2:]:
        return F.adaptive_avg_pool2d(f_student, teacher_factor.shape[-2:])
    return f_student


# --------------------------------------------------------------------------- parameters and set-up
class IEParams(StrategyParams):
    """Parameters common to ``ie_kd`` and ``ie_dml``."""

    inh_metric: str = Field("l1", description="distance for inheritance (a mutualkd.metrics plugin)")
    exp_metric: str = Field("l1", description="distance for exploration (a mutualkd.metrics plugin)")
    lambda_inh: float = Field(50.0, ge=0.0, allow_inf_nan=False, description="weight of the inheritance term")
    lambda_exp: float = Field(50.0, ge=0.0, allow_inf_nan=False, description="weight of the exploration term")
    rate: float = Field(0.5, gt=0.0, le=4.0, description="factor compression rate k: C' = round(k C)")
    factor_channels: int | None = Field(None, gt=0, description="fixed C' instead of k C (the authors used 32 for wide maps)")
    rec_loss: Literal["l1", "l2"] = Field("l1", description="reconstruction loss of the autoencoder")
    decoder: Literal["mirror", "linear_out"] = Field(
        "mirror", description="autoencoder decoder: mirror (the authors': the encoder's layout) or linear_out (biased linear last conv)"
    )
    split: Literal["natural", "random"] = Field("natural", description="how student channels are split")
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="share of student channels used for inheritance")
    split_seed: int = Field(0, description="seed of the random split (saved with the checkpoint)")


def resolve_metrics(params: IEParams, ctx: SetupContext) -> tuple[Metric, Metric]:
    """The two distance functions, looked up by name in the registry."""
    return ctx.metric(params.inh_metric, field="strategy.inh_metric"), ctx.metric(params.exp_metric, field="strategy.exp_metric")


def make_paraphraser(params: IEParams, channels: int) -> Paraphraser:
    return Paraphraser(channels, rate=params.rate, fixed_channels=params.factor_channels, rec_loss=params.rec_loss,
                       decoder=params.decoder)


def make_encoders(params: IEParams, student_channels: int, teacher_factor_channels: int) -> InheritExploreEncoders:
    return InheritExploreEncoders(
        student_channels, teacher_factor_channels, split=params.split, ratio=params.ratio, generator_seed=params.split_seed
    )


def ae_optimizer(lr: float | None, base: OptimizerConfig) -> OptimizerConfig:
    """The autoencoder's optimizer: the given one with ``lr`` replaced when set."""
    return base if lr is None else base.model_copy(update={"lr": lr})


CONSTANT = SchedulerConfig(name="constant")


# --------------------------------------------------------------------------- CKA's range
#: Above this expected CKA of unrelated factors, ``1 - CKA`` keeps less than half its range.
CKA_RANGE_LIMIT = 0.5


def null_cka(batch_size: int, features: int) -> float:
    """Expected biased linear CKA of two *independent* isotropic Gaussian batches ``[B, p]``.

    ``p / (p + B)``: the ratio of expectations ``E<K, L> / E(||K|| ||L||)`` for centred Gram
    matrices of Wishart-distributed ``X X^T`` (``E tr(A^2) = m p (p + m + 1)`` with ``m = B - 1``).
    It approaches 1 when ``B << p``: there even unrelated factors look similar to biased CKA.
    """
    return features / (features + batch_size)


def cka_range_note(params: IEParams, batch_size: int, factor_features: Iterable[int]) -> str | None:
    """A warning when a CKA metric of ``params`` has little range at this batch size, else None.

    ``factor_features``: the factor sizes ``C' * H * W`` the metrics will compare (one per
    teacher). ``cka``: warned when the expected CKA of unrelated factors, :func:`null_cka`,
    exceeds :data:`CKA_RANGE_LIMIT` for the largest factor. ``cka_debiased``: warned when the
    batch is below 4 samples, where it falls back to the biased estimator.
    """
    fields = [(f, getattr(params, f)) for f in ("inh_metric", "exp_metric")]
    biased = [f"strategy.{f}" for f, name in fields if name == "cka"]
    debiased = [f"strategy.{f}" for f, name in fields if name == "cka_debiased"]
    notes = []
    sizes = list(factor_features)
    if biased and sizes:
        p = max(sizes)
        null = null_cka(batch_size, p)
        if null > CKA_RANGE_LIMIT:
            notes.append(
                f"{' and '.join(biased)} = \"cka\" at batch size {batch_size} (data.batch_size, per process) with"
                f" factors of {p} values: linear CKA of two unrelated factors is already about {null:.2f}"
                f" (p / (p + B)), so 1 - CKA has little range and the term barely separates related from"
                f" unrelated factors. Use \"cka_debiased\", or a batch of well over {p} samples."
            )
    if debiased and batch_size < 4:
        notes.append(
            f"{' and '.join(debiased)} = \"cka_debiased\" at batch size {batch_size}: the unbiased HSIC needs"
            " at least 4 samples, so the biased CKA is used. Use data.batch_size >= 4."
        )
    return " ".join(notes) or None


def warn_cka_range(params: IEParams, ctx: SetupContext, factor_features: Iterable[int]) -> None:
    """Print :func:`cka_range_note` once, at set-up, on the main process (nothing when it is None)."""
    note = cka_range_note(params, ctx.recipe.data.batch_size, factor_features)
    if note:
        ctx.warn(f"{ctx.recipe_file}: {note}")

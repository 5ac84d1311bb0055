"""Factor autoencoder (paraphraser) and the student's inheritance / exploration encoders.

The teacher side is the *paraphraser* of Kim et al., "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018, as used by Huang et al., "Revisiting Knowledge
Distillation: An Inheritance and Exploration Framework", CVPR 2021 (IE-KD): an encoder maps a
feature map ``f`` with ``C`` channels to a *factor* with ``C'`` channels and a decoder maps it
back, trained with a reconstruction loss. The student side (:class:`InheritExploreEncoders`)
splits the student's feature-map channels into an inheritance part and an exploration part
and encodes each, with the same encoder structure, to a factor of the teacher factor's shape.

Layout (all convolutions 3x3, stride 1, padding 1, no bias, so the spatial size is kept), as
in the IE-KD authors' code (their ``Coder``, used for the encoder and the decoder alike):

* encoder: ``LeakyReLU(0.1) -> conv C->C -> BN -> LReLU -> conv C->C' -> BN -> LReLU
  -> conv C'->C' -> BN -> LReLU`` (the leading activation can be switched off with
  ``input_act=False``);
* decoder, ``decoder="mirror"`` (default, the authors' code): the same layout ``C' -> C' -> C
  -> C``, leading LeakyReLU and a final BatchNorm + LeakyReLU included;
* decoder, ``decoder="linear_out"`` (an option): no leading activation, and the last
  convolution is a plain one *with* bias and without BN or activation.

Channel counts follow the authors' code as well: ``C' = round(k * C)`` with Python's
round-half-even (the Factor Transfer code's ``int(round(C * rate))``), and the inheritance
part of the student's channels is ``floor(ratio * C)`` (the IE-KD code's ``int(C / 2)``).

Weights: convolutions ``N(0, 2 / (3 * 3 * out_channels))`` (the authors' init, Kaiming-normal,
fan-out, ReLU gain), BatchNorm weight 1 and bias 0, conv biases 0.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "NEGATIVE_SLOPE",
    "RecLossKind",
    "SplitMode",
    "DecoderKind",
    "factor_channels",
    "inheritance_channels",
    "reconstruction_loss",
    "init_factor_weights",
    "FactorEncoder",
    "FactorDecoder",
    "Paraphraser",
    "InheritExploreEncoders",
]

#: Negative slope of every LeakyReLU in the factor modules (Kim et al. 2018).
NEGATIVE_SLOPE = 0.1

RecLossKind = Literal["l1", "l2"]
SplitMode = Literal["natural", "random"]
DecoderKind = Literal["mirror", "linear_out"]

#: Guard of ``floor(ratio * C)`` against binary rounding (``0.29 * 100 = 28.999999999999996``).
_FLOOR_TOLERANCE = 1e-9


def _check_channels(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def factor_channels(in_channels: int, rate: float = 0.5, fixed: int | None = None) -> int:
    """Number of factor channels ``C'`` for a feature map with ``in_channels`` channels.

    ``C' = round(rate * C)`` with Python's round-half-even, as the Factor Transfer code's
    ``int(round(C * rate))`` (so ``C = 5, k = 0.5`` gives 2, ``C = 7`` gives 4), at least 1; or
    ``fixed`` when given (Kim et al. 2018 use a compression rate ``k = 0.5``; for very wide maps
    the IE-KD authors used a fixed 32 channels).

    Raises:
        ValueError: ``in_channels < 1``, ``rate <= 0`` or ``fixed < 1``.
    """
    _check_channels("in_channels", in_channels)
    if fixed is not None:
        _check_channels("fixed", fixed)
        return fixed
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"the factor compression rate must be a positive number, got {rate!r}")
    return max(1, int(round(rate * in_channels)))


def inheritance_channels(in_channels: int, ratio: float = 0.5) -> int:
    """Channels of the inheritance part when ``in_channels`` student channels are split.

    ``floor(ratio * C)``, the IE-KD authors' ``int(C / 2)`` at ``ratio = 0.5`` (odd counts give
    the extra channel to the exploration part). The exploration part gets the rest. The floor
    tolerates binary rounding of the product (``0.29 * 100`` counts as 29).
    """
    _check_channels("in_channels", in_channels)
    return int(math.floor(ratio * in_channels + _FLOOR_TOLERANCE))


def reconstruction_loss(f: Tensor, recon: Tensor, kind: RecLossKind = "l1") -> Tensor:
    """Reconstruction loss ``L_rec`` of the factor autoencoder (mean over all elements).

    * ``"l1"``: mean absolute error ``mean |f - recon|`` (the IE-KD authors' code; default);
    * ``"l2"``: mean squared error ``mean (f - recon)^2`` (the squared L2 of Kim et al. 2018,
      averaged over elements).

    Computed in at least float32 (half / bfloat16 inputs are upcast); returns a scalar.

    Raises:
        ValueError: shapes differ or ``kind`` is unknown.
    """
    if kind not in get_args(RecLossKind):
        raise ValueError(f"unknown reconstruction loss {kind!r}; expected 'l1' or 'l2'")
    if f.shape != recon.shape:
        raise ValueError(
            f"reconstruction_loss: feature map and reconstruction shapes differ: "
            f"{tuple(f.shape)} and {tuple(recon.shape)}"
        )
    dtype = torch.promote_types(f.dtype, recon.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    diff = f.to(dtype) - recon.to(dtype)
    if kind == "l1":
        return diff.abs().mean()
    return diff.pow(2).mean()


def init_factor_weights(module: nn.Module) -> None:
    """The authors' initialisation, in place: conv weights ``N(0, 2 / (k * k * out_channels))``
    (Kaiming-normal, fan-out, ReLU gain), zero conv biases, BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _conv3x3(c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=bias)


def _conv_bn_act(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        _conv3x3(c_in, c_out, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    ]


class FactorEncoder(nn.Module):
    """Factor encoder of Factor Transfer (Kim et al. 2018) as used by IE-KD (Huang et al. 2021).

    Three 3x3 / stride-1 / padding-1 convolutions without bias, each followed by BatchNorm2d and
    LeakyReLU(0.1); channels ``C -> C -> C' -> C'`` (only the second conv changes the count).
    With ``input_act=True`` (the authors' code) a LeakyReLU(0.1) is applied to the input first
    (out of place: the caller's feature map is not modified).

    ``forward(x: [B, C, H, W]) -> [B, C', H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, input_act: bool = True) -> None:
        super().__init__()
        _check_channels("in_channels", in_channels)
        _check_channels("out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.input_act: nn.Module = (
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=False) if input_act else nn.Identity()
        )
        self.body = nn.Sequential(
            *_conv_bn_act(in_channels, in_channels),
            *_conv_bn_act(in_channels, out_channels),
            *_conv_bn_act(out_channels, out_channels),
        )
        init_factor_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FactorEncoder expects a feature map [B, {self.in_channels}, H, W], "
                f"got shape {tuple(x.shape)}"
            )
        return self.body(self.input_act(x))


class FactorDecoder(nn.Module):
    """Factor decoder, the mirror of :class:`FactorEncoder`: ``C' -> C' -> C -> C``.

    Three 3x3 / stride-1 / padding-1 convolutions.

    * ``kind="mirror"`` (default; the IE-KD authors' decoder, their ``Coder(C', C)``): exactly
      the encoder's layout, ``LeakyReLU(0.1)`` on the factor first, then three convolutions
      without bias, each followed by BatchNorm2d and LeakyReLU(0.1).
    * ``kind="linear_out"``: no leading activation; the first two convolutions have no bias and
      are followed by BatchNorm2d and LeakyReLU(0.1); the last is a plain convolution with bias
      and no BN / activation (a linear output layer, not the authors' form).

    ``forward(factor: [B, C', H, W]) -> [B, C, H, W]``.
    """

    def __init__(self, factor_channels: int, out_channels: int, kind: DecoderKind = "mirror") -> None:
        super().__init__()
        _check_channels("factor_channels", factor_channels)
        _check_channels("out_channels", out_channels)
        if kind not in get_args(DecoderKind):
            raise ValueError(f"unknown decoder {kind!r}; expected 'mirror' or 'linear_out'")
        self.factor_channels = factor_channels
        self.out_channels = out_channels
        self.kind: DecoderKind = kind
        self.input_act: nn.Module = (
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=False) if kind == "mirror" else nn.Identity()
        )
        last: list[nn.Module] = (
            _conv_bn_act(out_channels, out_channels)
            if kind == "mirror"
            else [_conv3x3(out_channels, out_channels, bias=True)]
        )
        self.body = nn.Sequential(
            *_conv_bn_act(factor_channels, factor_channels),
            *_conv_bn_act(factor_channels, out_channels),
            *last,
        )
        init_factor_weights(self)

    def forward(self, factor: Tensor) -> Tensor:
        if factor.ndim != 4 or factor.shape[1] != self.factor_channels:
            raise ValueError(
                f"FactorDecoder expects a factor [B, {self.factor_channels}, H, W], "
                f"got shape {tuple(factor.shape)}"
            )
        return self.body(self.input_act(factor))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class Paraphraser(nn.Module):
    """Teacher-side factor autoencoder (the "paraphraser" of Kim et al. 2018; Huang et al. 2021).

    Args:
        in_channels: channels ``C`` of the teacher feature map.
        rate: compression rate ``k``; ``C' = round(k * C)`` (see :func:`factor_channels`).
        fixed_channels: use this ``C'`` instead of the rate (e.g. 32 for very wide maps).
        rec_loss: ``"l1"`` (mean absolute error, authors' code, default) or ``"l2"`` (mean
            squared error, the paper's squared L2).
        input_act: apply LeakyReLU(0.1) to the encoder input (authors' code).
        decoder: ``"mirror"`` (the authors' decoder, default) or ``"linear_out"``
            (see :class:`FactorDecoder`).

    Attributes:
        in_channels, factor_channels, rec_loss, encoder (:class:`FactorEncoder`),
        decoder (:class:`FactorDecoder`).

    ``forward(f: [B, C, H, W]) -> (factor [B, C', H, W], reconstruction [B, C, H, W])``.
    """

    def __init__(
        self,
        in_channels: int,
        rate: float = 0.5,
        fixed_channels: int | None = None,
        rec_loss: RecLossKind = "l1",
        input_act: bool = True,
        decoder: DecoderKind = "mirror",
    ) -> None:
        super().__init__()
        if rec_loss not in get_args(RecLossKind):
            raise ValueError(f"unknown reconstruction loss {rec_loss!r}; expected 'l1' or 'l2'")
        self.in_channels = in_channels
        self.factor_channels = factor_channels(in_channels, rate, fixed_channels)
        self.rec_loss: RecLossKind = rec_loss
        self.encoder = FactorEncoder(in_channels, self.factor_channels, input_act=input_act)
        self.decoder = FactorDecoder(self.factor_channels, in_channels, kind=decoder)

    def encode(self, f: Tensor) -> Tensor:
        """The factor ``F = Encoder(f)``, ``[B, C', H, W]``."""
        return self.encoder(f)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(f)
        return factor, self.decoder(factor)

    def reconstruction_loss(self, f: Tensor, recon: Tensor) -> Tensor:
        """:func:`reconstruction_loss` with this paraphraser's ``rec_loss`` kind."""
        return reconstruction_loss(f, recon, self.rec_loss)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, factor_channels={self.factor_channels}, "
            f"rec_loss={self.rec_loss!r}, decoder={self.decoder.kind!r}"
        )


class InheritExploreEncoders(nn.Module):
    """Student-side inheritance and exploration encoders of IE-KD (Huang et al. 2021).

    The student's feature map channels are split once, at construction, into an inheritance
    index set and an exploration index set:

    * ``split="natural"``: the first ``floor(ratio * C)`` channels (:func:`inheritance_channels`,
      the authors' ``int(C / 2)``) / the rest;
    * ``split="random"``: one fixed permutation of ``range(C)`` drawn from
      ``torch.Generator().manual_seed(generator_seed)``, cut at the same position.

    The index sets are persistent buffers ``inh_index`` and ``exp_index`` (int64), saved in the
    ``state_dict`` and restored by ``load_state_dict`` (which therefore overrides the split of
    the module it is loaded into). Each part is encoded by its own :class:`FactorEncoder` (the
    Factor Transfer encoder of Kim et al. 2018, no decoder): ``inh`` maps ``len(inh_index)`` and
    ``exp`` maps ``len(exp_index)`` channels to ``factor_channels`` channels, so both factors have
    the teacher factor's shape.

    ``forward(f: [B, C, H, W]) -> (F_inh, F_exp)``, each ``[B, factor_channels, H, W]``.

    Raises:
        ValueError: ``ratio`` not in ``(0, 1)``, either part would be empty, unknown ``split``,
        or non-positive channel counts.
    """

    inh_index: Tensor
    exp_index: Tensor

    def __init__(
        self,
        in_channels: int,
        factor_channels: int,
        split: SplitMode = "natural",
        ratio: float = 0.5,
        generator_seed: int = 0,
        input_act: bool = True,
    ) -> None:
        super().__init__()
        _check_channels("in_channels", in_channels)
        _check_channels("factor_channels", factor_channels)
        if split not in get_args(SplitMode):
            raise ValueError(f"unknown channel split {split!r}; expected 'natural' or 'random'")
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
            raise ValueError(f"the inheritance ratio must lie strictly between 0 and 1, got {ratio!r}")
        n_inh = inheritance_channels(in_channels, ratio)
        n_exp = in_channels - n_inh
        if n_inh < 1 or n_exp < 1:
            raise ValueError(
                f"splitting {in_channels} channels with ratio {ratio} gives {n_inh} inheritance "
                f"and {n_exp} exploration channels; both parts need at least 1 channel"
            )
        if split == "natural":
            order = torch.arange(in_channels, dtype=torch.long)
        else:
            gen = torch.Generator().manual_seed(int(generator_seed))
            order = torch.randperm(in_channels, generator=gen, dtype=torch.long)
        self.in_channels = in_channels
        self.factor_channels = factor_channels
        self.split = split
        self.ratio = float(ratio)
        self.register_buffer("inh_index", order[:n_inh].clone(), persistent=True)
        self.register_buffer("exp_index", order[n_inh:].clone(), persistent=True)
        self.inh = FactorEncoder(n_inh, factor_channels, input_act=input_act)
        self.exp = FactorEncoder(n_exp, factor_channels, input_act=input_act)

    def split_channels(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_inh, f_exp)``: the feature map's channels at ``inh_index`` / ``exp_index``."""
        if f.ndim != 4 or f.shape[1] != self.in_channels:
            raise ValueError(
                f"InheritExploreEncoders expects a feature map [B, {self.in_channels}, H, W], "
                f"got shape {tuple(f.shape)}"
            )
        return f.index_select(1, self.inh_index), f.index_select(1, self.exp_index)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        f_inh, f_exp = self.split_channels(f)
        return self.inh(f_inh), self.exp(f_exp)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, factor_channels={self.factor_channels}, "
            f"split={self.split!r}, ratio={self.ratio}, "
            f"n_inh={self.inh_index.numel()}, n_exp={self.exp_index.numel()}"
        )

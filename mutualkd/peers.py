"""Peers: timm models wrapped so that one call gives features and logits.

The features are what ``forward_features`` returns (last stage, before pooling) and the
logits come from ``forward_head`` on those same features, so a forward pass computes the
backbone once. The wrapper's ``forward`` does both, which is also what lets
DistributedDataParallel see the call (it only hooks ``forward``).

With a peer's ``feature_stage`` set, the features are instead the map of that stage (an
index of the model's ``feature_info``, negative from the end), from timm's
``forward_intermediates``, which returns it together with the final features the head
needs: still one backbone pass. A timm ResNet fed 32 px images ends at a 1x1 map; its
stage -2 or -3 gives the IE autoencoder a 2x2 or 4x4 map.

Feature maps are handed to strategies as ``[B, C, H, W]``:

* NCHW maps (CNNs) as they are; NHWC maps (timm models with ``output_fmt == "NHWC"``,
  e.g. Swin) are permuted;
* token sequences ``[B, N, C]`` (ViT-style) drop their ``num_prefix_tokens`` prefix
  tokens (class / register tokens) and are laid out on the patch grid, row-major,
  which needs ``N - prefix`` to equal the grid's ``H * W``;
* anything else is refused with a message naming the model.
"""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mutualkd.errors import RecipeError, UserError, unknown_name_hint

__all__ = ["InputNorm", "PeerModule", "check_model_name", "create_peer", "input_norm", "to_feature_map"]


def to_feature_map(raw: Tensor, model: nn.Module, model_name: str) -> Tensor:
    """Lay ``forward_features`` output out as ``[B, C, H, W]`` by the rules above."""
    if raw.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC" or str(getattr(model, "output_fmt", "")).endswith("NHWC"):
            return raw.permute(0, 3, 1, 2)
        return raw
    if raw.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        tokens = raw[:, prefix:, :]
        n = tokens.shape[1]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None and int(grid[0]) * int(grid[1]) == n:
            h, w = int(grid[0]), int(grid[1])
        elif math.isqrt(n) ** 2 == n:
            h = w = math.isqrt(n)
        else:
            raise UserError(
                f"model '{model_name}' returns {n} tokens after dropping {prefix} prefix tokens,"
                " which do not form a square patch grid",
                hint="use a model whose forward_features returns a feature map or a square token grid",
            )
        return tokens.transpose(1, 2).reshape(raw.shape[0], raw.shape[2], h, w)
    raise UserError(
        f"model '{model_name}' returns features of shape {tuple(raw.shape)} from forward_features;"
        " this strategy needs a feature map [B, C, H, W] or ViT tokens [B, N, C]",
        hint="choose a convolutional or ViT-style model, or a strategy that only uses logits",
    )


def _stage_index(model: nn.Module, model_name: str, stage: int, *, file: str, field: str) -> int:
    """``stage`` as a non-negative index of ``model.feature_info``, or a RecipeError naming the stages."""
    info = getattr(model, "feature_info", None)
    if not callable(getattr(model, "forward_intermediates", None)) or not info:
        raise RecipeError(
            f"model '{model_name}' has no forward_intermediates, so feature_stage cannot choose its stage",
            file=file, field=field, hint="leave feature_stage unset (the last stage), or choose a timm model that has it",
        )
    entries = list(info.info if hasattr(info, "info") else info)
    n = len(entries)
    if not -n <= stage < n:
        stages = ", ".join(f"{i} ({e.get('module')}, /{e.get('reduction')})" for i, e in enumerate(entries))
        raise RecipeError(f"feature_stage = {stage} is not a stage of '{model_name}', which has {n}: {stages}",
                          file=file, field=field, hint=f"use an index from {-n} to {n - 1}; -1 is the last stage")
    return stage % n


class InputNorm(nn.Module):
    """Re-normalise batches from the data set's normalisation to the one a network's weights expect.

    The batches arrive as ``(p - mean_data) / std_data`` for pixels ``p`` in [0, 1]; a network
    pretrained with another normalisation (ImageNet's, say) gets ``(p - mean_w) / std_w``,
    computed as ``x * std_data / std_w + (mean_data - mean_w) / std_w``. As in timm, weights
    normalised for another number of channels use the mean of their mean and std.
    """

    def __init__(self, data_mean: tuple[float, ...], data_std: tuple[float, ...], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        c = len(data_mean)
        if len(mean) != c:
            mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
        self.mean, self.std = tuple(mean), tuple(std)
        dm, ds, m, sd = (torch.tensor(v, dtype=torch.float32).view(1, c, 1, 1) for v in (data_mean, data_std, mean, std))
        self.register_buffer("scale", ds / sd, persistent=False)
        self.register_buffer("shift", (dm - m) / sd, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def input_norm(data_mean: tuple[float, ...], data_std: tuple[float, ...], mean: tuple[float, ...] | None,
               std: tuple[float, ...] | None) -> InputNorm | None:
    """An :class:`InputNorm` when the weights expect another normalisation than the data set's, else None."""
    if mean is None or std is None:
        return None
    norm = InputNorm(data_mean, data_std, mean, std)
    same = all(abs(a - b) < 1e-6 for a, b in zip((*norm.mean, *norm.std), (*data_mean, *data_std)))
    return None if same else norm


class PeerModule(nn.Module):
    """A timm model whose forward returns ``(features, logits)`` with one backbone pass.

    ``feature_stage`` (see the module docstring) chooses the stage whose map is returned;
    None, or the last stage, uses ``forward_features``. ``input_norm`` (an :class:`InputNorm`)
    runs first when the model's weights expect inputs normalised otherwise than the batches.
    """

    def __init__(self, model: nn.Module, model_name: str, feature_map: bool = True, feature_stage: int | None = None,
                 *, file: str = "<recipe>", field: str = "peers.feature_stage",
                 input_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.feature_map = feature_map
        self.input_norm = input_norm
        self.stage: int | None = None
        if feature_stage is not None:
            index = _stage_index(model, model_name, feature_stage, file=file, field=field)
            info = getattr(model, "feature_info")
            last = len(list(info.info if hasattr(info, "info") else info)) - 1
            self.stage = None if index == last else index

    def norm_meta(self) -> dict[str, list[float]]:
        """The normalisation this peer's weights expect, for a checkpoint's meta.json (empty: the data set's)."""
        norm = self.input_norm
        if not isinstance(norm, InputNorm):
            return {}
        return {"mean": list(norm.mean), "std": list(norm.std)}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.stage is not None:
            raw, maps = self.model.forward_intermediates(x, indices=[self.stage], output_fmt="NCHW")
            return maps[0], self.model.forward_head(raw)
        raw = self.model.forward_features(x)
        logits = self.model.forward_head(raw)
        feats = to_feature_map(raw, self.model, self.model_name) if self.feature_map else raw
        return feats, logits


def check_model_name(model_name: str, *, file: str = "<recipe>", field: str = "peers") -> None:
    """A RecipeError with close matches unless timm knows ``model_name``."""
    import mutualkd.models  # noqa: F401  (registers the CIFAR families into timm)

    if not timm.is_model(model_name):
        raise RecipeError(
            f"unknown model '{model_name}'",
            file=file,
            field=f"{field}.model",
            hint=unknown_name_hint("timm model", model_name, timm.list_models())
            + "; search them with timm.list_models('*pattern*')",
        )


def create_peer(
    model_name: str,
    *,
    num_classes: int,
    in_chans: int,
    kwargs: dict[str, Any] | None = None,
    file: str = "<recipe>",
    field: str = "peers",
) -> nn.Module:
    """``timm.create_model`` with the data set's class and channel counts, or a RecipeError."""
    check_model_name(model_name, file=file, field=field)
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))
    except TypeError as e:
        raise RecipeError(
            f"model '{model_name}' does not accept these kwargs: {e}",
            file=file,
            field=f"{field}.kwargs",
            hint="remove or rename the keyword, or give it a value of the kind the model's constructor in timm takes",
        ) from None
    except (ValueError, AssertionError, AttributeError, KeyError, IndexError, RuntimeError, OverflowError,
            ZeroDivisionError) as e:
        # a keyword of the right name with a value of the wrong kind or range fails deep in timm
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RecipeError(
            f"model '{model_name}' cannot be built with kwargs {kwargs}: {type(e).__name__}: {first}",
            file=file,
            field=f"{field}.kwargs",
            hint="give each keyword a value of the kind the model's constructor in timm takes",
        ) from None
    for attr in ("forward_features", "forward_head"):
        if not hasattr(model, attr):
            raise RecipeError(
                f"model '{model_name}' lacks timm's {attr}()", file=file, field=f"{field}.model",
                hint="use a model built on timm's model API",
            )
    return model


@torch.no_grad()
def probe_feature_shape(peer: PeerModule, in_chans: int, image_size: tuple[int, int], device: torch.device) -> tuple[int, ...]:
    """Shape (without batch) of a peer's feature map, from one forward pass on zeros."""
    was_training = peer.training
    peer.eval()
    try:
        feats, _ = peer(torch.zeros(2, in_chans, *image_size, device=device))
    finally:
        peer.train(was_training)
    return tuple(feats.shape[1:])

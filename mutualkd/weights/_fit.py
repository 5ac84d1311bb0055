"""Fitting weights to a model: reading a weights file, checking heads and keys, adapting the first convolution.

Pure helpers of :mod:`mutualkd.weights` on a :class:`~mutualkd.weights._source.Network`: every
source that is not loaded by timm itself (a run's peer, a weights file) goes through
:func:`load_into`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mutualkd.errors import CheckpointError, UserError
from mutualkd.trust import UnsafeFileError
from mutualkd.weights._source import Network

__all__ = ["finite", "as_tuple", "read_weights_file", "classifier_names", "error_for", "load_into"]


def finite(net: Network, where: str) -> Network:
    """``net``, unless its weights hold NaN or Inf (every loss would be non-finite at the first step)."""
    for name, t in net.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            src = net.source.describe() if net.source is not None else "the weights"
            raise error_for(net)(f"{src} holds non-finite values (NaN or Inf) in {name!r}", where=where,
                                 hint="name weights saved before training diverged (an earlier checkpoint),"
                                 " or other weights")
    return net


def as_tuple(v: Any) -> tuple[float, ...] | None:
    """A per-channel list from meta.json (a mean, a std) as floats; None when absent or empty."""
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) and v else None


def read_weights_file(path: Path, *, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, through timm's ``load_state_dict`` (``weights_only=True``).

    Wrappers (``state_dict_ema``/``model_ema`` first, as timm does, then ``state_dict``,
    ``model``) and ``module.`` / ``_orig_mod.`` prefixes are removed. A pickle that holds
    anything but tensors and plain containers is refused unread (:class:`UnsafeFileError`).
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except RuntimeError as e:
        if "weights_only" in str(e) or "pickle" in str(e):
            raise UnsafeFileError(
                f"{path} holds pickled objects other than tensors{_globals_of(path)}; unpickling them could run code,"
                " so the file is not loaded", where=where,
                hint="if you trust the file, save its tensors with safetensors: "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors'), and name that file",
            ) from None
        raise UserError(f"{path} cannot be read: {str(e)[:300]}", where=where, hint="check the file") from None
    except Exception as e:  # a truncated zip, a safetensors header that does not parse, ...
        raise UserError(f"{path} cannot be read as weights: {type(e).__name__}: {str(e)[:300]}", where=where,
                        hint="name a .safetensors file or a torch state dict (.pth, .pt, .bin)") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict", where=where, hint="save model.state_dict() to the file")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path} is not a state dict: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor",
                        where=where, hint="save model.state_dict() (tensors only) to the file")
    return state


def _globals_of(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


# --------------------------------------------------------------------------- fitting weights to a model
def classifier_names(model: nn.Module) -> list[str]:
    """The module names of the model's classifier (timm's ``pretrained_cfg['classifier']``, else ``get_classifier``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    found = [n for n in (names or []) if n in modules]
    if found:
        return found
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return [n for n, m in modules.items() if m is head and n] if head is not None else []


def error_for(net: Network) -> type[UserError]:
    """CheckpointError for weights from a mutualkd run, UserError for the others (both exit 2)."""
    return CheckpointError if net.source is not None and net.source.kind == "run" else UserError


def load_into(net: Network, state: dict[str, torch.Tensor], *, reset_head: bool, where: str,
              trained_on: str | None = None) -> None:
    """Load ``state`` into ``net.model``: the head, the first convolution and every key checked."""
    model = net.model
    own = model.state_dict()
    state = dict(state)
    origin = net.source.location if net.source else "the weights"
    heads = classifier_names(model)
    head_keys = {k for h in heads for k in own if k.startswith(h + ".")}
    src_classes = next((int(state[k].shape[0]) for k in sorted(head_keys) if k.endswith("weight") and k in state), None)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if reset_head:
        for k in [k for h in heads for k in state if k.startswith(h + ".")]:
            del state[k]
        net.head_reset = True
        net.notes.append("new classifier (reset_head)")
    elif src_classes is not None and src_classes != num_classes:
        on = f" (trained on {trained_on})" if trained_on else ""
        raise error_for(net)(
            f"the classifier of {origin}{on} has {src_classes} classes, this recipe's data set has {num_classes}",
            where=where,
            hint="set reset_head = true for a new, untrained classifier (a features-only teacher such as IE-KD's, or"
            " fine-tuning), or use weights trained on these classes",
        )
    _adapt_first_conv(net, state, own)
    skip = set(head_keys) if net.head_reset else set()
    missing = [k for k in own if k not in state and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(repr(k) for k in missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(repr(k) for k in unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (first: {k!r}: {tuple(state[k].shape)} in the weights,"
                         f" {tuple(own[k].shape)} in the model)")
        raise error_for(net)(
            f"the weights of {origin} do not fit model '{net.model_name}': keys " + "; ".join(parts), where=where,
            hint="name the architecture (and kwargs) the weights were saved from",
        )
    model.load_state_dict(state, strict=False)  # every key checked above; reset heads keep their new weights


def _adapt_first_conv(net: Network, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Weights for 3-channel images into a 1-channel model (or the reverse): timm's ``adapt_input_conv``."""
    from timm.models import adapt_input_conv

    cfg = getattr(net.model, "pretrained_cfg", None) or {}
    convs = cfg.get("first_conv")
    for conv in [convs] if isinstance(convs, str) else list(convs or []):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1] \
                and state[key].shape[0] == own[key].shape[0] and state[key].shape[2:] == own[key].shape[2:]:
            src = int(state[key].shape[1])
            state[key] = adapt_input_conv(int(own[key].shape[1]), state[key])
            net.notes.append(f"first convolution adapted from {src} to {own[key].shape[1]} input channel(s)")

"""Branched peers: one network split after a named stage into a shared trunk and K branches.

Online-distillation methods (ONE, CL-ILR, OKDDip, PCL, FFL) train K classifiers that share
their first stages. A ``[[peers]]`` table with ``branches = K`` and ``split_after = "layer2"``
asks for that: K timm models of the table's architecture are built (each initialised
independently, or from the same weights), and models 1..K-1 are made to *share* model 0's
trunk modules (the same ``nn.Module`` objects). So branch k is always a whole timm model of
the original architecture, trunk included: exporting it is saving that model.

A model is splittable when its ``forward_features`` is a plain chain of its top-level
children; :data:`CHAINS` lists that chain per family (mutualkd's CIFAR ResNets and WRNs,
timm's ``ResNet``). Anything else is refused with the families supported.

The trunk runs once per batch, or once per view when branches see different views; with
``ilr = true`` the gradient that flows back into the trunk from a split point is divided by
the number of branches fed by it (the Internal Layer Rescaling of Song & Chai, 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mutualkd.errors import RecipeError

__all__ = ["CHAINS", "BranchedNet", "scale_gradient", "stage_chain", "branch_state_dict", "check_split"]


#: Model class name -> the top-level children that ``forward_features`` runs, in order.
CHAINS: dict[str, tuple[str, ...]] = {
    "CifarResNet": ("conv1", "bn1", "act1", "layer1", "layer2", "layer3"),
    "CifarWideResNet": ("conv1", "layer1", "layer2", "layer3", "bn", "act"),
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
}
_FAMILIES = "mutualkd's cifar_resnet* and cifar_wrn_*, and timm's resnet* (ResNet class)"


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient times ``scale`` backward (ILR at a split: ``scale = 1 / K``)."""
    return _ScaleGradient.apply(x, scale)


def stage_chain(model: nn.Module) -> tuple[str, ...] | None:
    """The chain of top-level children that ``model.forward_features`` runs, or None (not splittable)."""
    chain = CHAINS.get(type(model).__name__)
    if chain is None or not all(hasattr(model, n) for n in chain):
        return None
    return chain


def check_split(model: nn.Module, model_name: str, split_after: str, *, file: str, field: str) -> int:
    """The index of ``split_after`` in the model's chain, or a RecipeError naming what is supported."""
    chain = stage_chain(model)
    if chain is None:
        raise RecipeError(
            f"model '{model_name}' ({type(model).__name__}) cannot be split into branches",
            file=file, field=field, hint=f"branched peers are supported for {_FAMILIES}",
        )
    points = chain[:-1]  # a branch needs at least one stage of its own
    if split_after not in points:
        raise RecipeError(
            f"split_after = \"{split_after}\" is not a stage of '{model_name}' after which it can branch",
            file=file, field=field, hint=f"use one of: {', '.join(points)}",
        )
    return chain.index(split_after)


class BranchedNet(nn.Module):
    """A shared trunk and K branches; branch k together with the trunk is ``models[k]``.

    ``forward(x)`` runs the trunk once and every branch on it and returns
    ``(trunk, features, logits)``: lists with one entry per branch (the trunk map a branch
    was fed, its feature map as ``forward_features`` returns it, its logits). With several
    views, ``forward(views, view_of)`` runs the trunk once per view used and branch k on
    view ``view_of[k]``. One call for all branches is what lets DistributedDataParallel
    see (and synchronise) the whole network.

    The state dict holds the trunk once (``trunk.*``) and each branch's own modules
    (``branches.<k>.*``); :func:`branch_state_dict` turns it into branch k's timm state dict.
    """

    def __init__(self, models: Sequence[nn.Module], model_name: str, split_after: str, *, ilr: bool = False,
                 input_norm: nn.Module | None = None, file: str = "<recipe>", field: str = "peers") -> None:
        super().__init__()
        if len(models) < 2:
            raise ValueError("a branched network needs at least two branches")
        chain = stage_chain(models[0])
        split = check_split(models[0], model_name, split_after, file=file, field=field)
        assert chain is not None
        self.model_name = model_name
        self.split_after = split_after
        self.ilr = ilr
        self.trunk_names = chain[: split + 1]
        self.branch_chain = chain[split + 1:]
        self.input_norm = input_norm
        self.trunk = nn.ModuleDict({n: getattr(models[0], n) for n in self.trunk_names})
        for m in models[1:]:
            for n in self.trunk_names:
                setattr(m, n, self.trunk[n])  # the same module object: one trunk, K views of it
        self.branches = nn.ModuleList(
            nn.ModuleDict({n: c for n, c in m.named_children() if n not in self.trunk_names}) for m in models
        )
        # The whole timm models, not registered as children (their parameters are the
        # trunk's and the branches' above): what export and the heads' ``forward_head`` use.
        self.__dict__["models"] = list(models)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def train(self, mode: bool = True) -> BranchedNet:
        super().train(mode)
        for m in self.models:  # the timm models' own flags (head dropout reads them)
            m.training = mode
        return self

    def norm_meta(self) -> dict[str, list[float]]:
        norm = self.input_norm
        if norm is None or not hasattr(norm, "mean"):
            return {}
        return {"mean": list(norm.mean), "std": list(norm.std)}

    def run_trunk(self, x: Tensor) -> Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        for n in self.trunk_names:
            x = self.trunk[n](x)
        return x

    def run_branch(self, k: int, h: Tensor) -> tuple[Tensor, Tensor]:
        model, own = self.models[k], self.branches[k]
        for n in self.branch_chain:
            h = own[n](h)
        return h, model.forward_head(h)

    def forward(self, x: Tensor | Sequence[Tensor], view_of: Sequence[int] | None = None
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        k_all = range(self.num_branches)
        views = [x] if isinstance(x, Tensor) else list(x)
        assign = [0] * self.num_branches if view_of is None else [int(v) for v in view_of]
        trunks: dict[int, Tensor] = {}
        for v in sorted(set(assign)):
            h = self.run_trunk(views[v])
            if self.ilr:
                h = scale_gradient(h, 1.0 / assign.count(v))
            trunks[v] = h
        feats, logits = [], []
        for k in k_all:
            f, z = self.run_branch(k, trunks[assign[k]])
            feats.append(f)
            logits.append(z)
        return [trunks[assign[k]] for k in k_all], feats, logits


def branch_state_dict(net_state: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Branch ``k``'s timm state dict (trunk + its own modules) from a :class:`BranchedNet` state dict."""
    out: dict[str, Tensor] = {}
    own = f"branches.{k}."
    for key, v in net_state.items():
        if key.startswith("trunk."):
            out[key[len("trunk."):]] = v
        elif key.startswith(own):
            out[key[len(own):]] = v
    return out

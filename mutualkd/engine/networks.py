"""The run's networks from its recipe: whole peers, branched networks, temporal means, and views.

A ``[[peers]]`` table becomes one module (a slot): a :class:`~mutualkd.peers.PeerModule` for a
whole network, a :class:`~mutualkd.branching.BranchedNet` for a branched one; every peer it
makes gets a :class:`~mutualkd.strategy.PeerInfo`. A strategy's temporal means are frozen
copies of networks (slots ``<network>_ema``), and its views decide how many augmentations of a
batch the data pipeline draws. Used by :mod:`.build`; nothing here writes a file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mutualkd.branching import BranchedNet
from mutualkd.config import Recipe
from mutualkd.data import DatasetInfo
from mutualkd.errors import RecipeError, UserError
from mutualkd.peers import PeerModule, input_norm, probe_feature_shape
from mutualkd.strategy import EMA_SUFFIX, PeerInfo, Strategy, TemporalMean
from mutualkd.weights import announce, peer_network

__all__ = ["Unit", "Slot", "make_networks", "probe_peer", "temporal_means", "peer_views", "networks_of"]


@dataclass
class Unit:
    """Parameters updated together by one optimizer: a peer and what is attached to it, or an auxiliary unit."""

    name: str
    modules: list[str]
    network: str | None = None  # the peer network (whole or branched) in this unit, named like it
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    clip: tuple[float, str] | None = None  # (clip_grad, clip_mode) of the unit's optimizer config


@dataclass
class Slot:
    """One module of the run: as the strategy built it (``inner``) and as the engine calls it."""

    name: str
    inner: nn.Module
    wrapped: nn.Module  # DistributedDataParallel and/or torch.compile around ``inner``, or ``inner``
    unit: str | None  # None: frozen


def networks_of(recipe: Recipe) -> dict[str, list[str]]:
    """Network (unit) name -> its peers, in recipe order."""
    return {base: pc.branch_names(base) for base, pc in zip(recipe.network_names(), recipe.peers)}


def _input_hint(model: nn.Module, info: DatasetInfo, i: int) -> str:
    """How to make a peer accept the data: the model's own input size and the recipe keys."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    expected = cfg.get("input_size")
    h, w = info.image_size
    text = f"the model is configured for input {tuple(expected)}; " if expected else ""
    if hasattr(model, "patch_embed"):
        return text + f"set `kwargs = {{ img_size = {h} }}` in [[peers]] table {i}, or data.image_size to its input size"
    return text + "set data.image_size to a larger size, or choose a model made for small images (e.g. cifar_resnet20)"


def probe_peer(module: PeerModule, info: DatasetInfo, device: torch.device, *, file: str, i: int, name: str) -> tuple[int, ...]:
    """The peer's feature shape from one forward pass, or a RecipeError naming the peer and the fix."""
    c, (h, w) = info.in_chans, info.image_size
    try:
        return probe_feature_shape(module, c, (h, w), device)
    except UserError as e:  # features that are not a map (see mutualkd.peers)
        raise RecipeError(f"peer '{name}': {e.message}", file=file, field=f"peers[{i}].model", hint=e.hint) from None
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RecipeError(
            f"peer '{name}' ({module.model_name}) cannot take the data's {c}x{h}x{w} images: {first}",
            file=file, field=f"peers[{i}]", hint=_input_hint(module.model, info, i),
        ) from None


def make_networks(recipe: Recipe, file: str, info: DatasetInfo, feature_map: bool, device: torch.device,
                channels_last: bool = False) -> tuple[list[nn.Module], list[PeerInfo]]:
    """One module per ``[[peers]]`` table (a :class:`PeerModule`, or a :class:`BranchedNet` for a branched
    table) and a :class:`PeerInfo` per peer."""
    names = recipe.network_names()
    modules: list[nn.Module] = []
    infos: list[PeerInfo] = []
    for i, pc in enumerate(recipe.peers):
        if pc.branches is not None:
            module, branch_infos = _make_branched(pc, i, names[i], info, device, channels_last, file)
            modules.append(module)
            infos += branch_infos
            continue
        # Random weights, or weights from a run, a file, a folder or timm's pretrained ones (mutualkd.weights).
        net = peer_network(pc, i, num_classes=info.num_classes, in_chans=info.in_chans, file=file)
        announce(net, f"peer '{names[i]}'" + (" (frozen)" if pc.frozen else ""))
        model = net.model
        peer = PeerModule(model, pc.model, feature_map=feature_map, feature_stage=pc.feature_stage,
                          file=file, field=f"peers[{i}].feature_stage",
                          input_norm=input_norm(info.mean, info.std, net.mean, net.std)).to(device)
        if pc.frozen:  # never trained: no gradient, and eval mode keeps its BatchNorm statistics
            peer.eval().requires_grad_(False)
        if channels_last:
            peer = peer.to(memory_format=torch.channels_last)
        shape = probe_peer(peer, info, device, file=file, i=i, name=names[i])
        infos.append(PeerInfo(i, names[i], pc.model, shape, model, frozen=pc.frozen, head_reset=net.head_reset,
                              network=names[i]))
        modules.append(peer)
    return modules, infos


def _make_branched(pc: Any, i: int, base: str, info: DatasetInfo, device: torch.device, channels_last: bool,
                   file: str) -> tuple[BranchedNet, list[PeerInfo]]:
    """K independently initialised models of the table's architecture, sharing model 0's trunk."""
    nets = [peer_network(pc, i, num_classes=info.num_classes, in_chans=info.in_chans, file=file)
            for _ in range(pc.branches)]
    announce(nets[0], f"network '{base}' ({pc.branches} branches after {pc.split_after})")
    module = BranchedNet([n.model for n in nets], pc.model, pc.split_after, ilr=pc.ilr,
                         input_norm=input_norm(info.mean, info.std, nets[0].mean, nets[0].std),
                         file=file, field=f"peers[{i}].split_after").to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    c, (h, w) = info.in_chans, info.image_size
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            trunks, feats, _ = module(torch.zeros(2, c, h, w, device=device))
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RecipeError(f"network '{base}' ({pc.model}) cannot take the data's {c}x{h}x{w} images: {first}",
                          file=file, field=f"peers[{i}]", hint=_input_hint(nets[0].model, info, i)) from None
    finally:
        module.train(was_training)
    infos = [PeerInfo(i, name, pc.model, tuple(feats[k].shape[1:]), nets[k].model, head_reset=nets[k].head_reset,
                      network=base, branch=k, trunk_shape=tuple(trunks[k].shape[1:]))
             for k, name in enumerate(pc.branch_names(base))]
    return module, infos


def temporal_means(strategy: Strategy[Any], recipe: Recipe, file: str, slots: dict[str, Slot]
                    ) -> dict[str, TemporalMean]:
    """A frozen, eval-mode copy of each network a strategy averages, as slot ``<network>_ema``."""
    networks = networks_of(recipe)
    for i, pc in enumerate(recipe.peers):
        if pc.branches is not None and recipe.peer_ema(i) is not None:
            raise RecipeError(
                "[ema] keeps EMA copies of whole peers; network '{}' is branched".format(recipe.network_names()[i]),
                file=file, field="ema" if pc.ema is None else f"peers[{i}].ema",
                hint="remove [ema] for it (a strategy that needs a temporal mean of the branches, such as pcl, keeps"
                " its own)",
            )
    means: dict[str, TemporalMean] = {}
    for tm in strategy.temporal_means():
        net = next((n for n, ps in networks.items() if tm.peer in ps), None)
        if net is None:
            raise UserError(f"strategy '{recipe.strategy.name}' asks for a temporal mean of '{tm.peer}', which is not"
                            " a peer of this run", hint="this is a bug in the strategy plugin")
        i = recipe.network_names().index(net)
        if recipe.peer_ema(i) is not None:
            raise RecipeError(
                f"strategy '{recipe.strategy.name}' keeps its own EMA (temporal mean) of network '{net}'; the recipe's"
                " [ema] would be a second one under the same names", file=file,
                field="ema" if recipe.peers[i].ema is None else f"peers[{i}].ema",
                hint="remove [ema] (the strategy's copy is evaluated and exported as <peer>_ema)",
            )
        name = net + EMA_SUFFIX
        if name in means:
            continue
        if name in slots:
            raise UserError(f"module name '{name}' is taken; the temporal mean of '{net}' needs it",
                            hint="rename the strategy's module")
        copy_ = copy.deepcopy(slots[net].inner).eval().requires_grad_(False)
        slots[name] = Slot(name, copy_, copy_, None)
        means[name] = tm
    return means


def peer_views(strategy: Strategy[Any], recipe: Recipe, file: str) -> tuple[dict[str, int], int]:
    """Each peer's view, and how many views a batch carries; a branched network's branches may differ."""
    asked = dict(strategy.views())
    peers = recipe.peer_names()
    unknown = sorted(set(asked) - set(peers))
    if unknown or any(not isinstance(v, int) or v < 0 for v in asked.values()):
        raise UserError(f"strategy '{recipe.strategy.name}' asks for views of {unknown or 'negative indices'}",
                        hint="this is a bug in the strategy plugin: views() maps peers to view indices 0, 1, ...")
    views = {p: int(asked.get(p, 0)) for p in peers}
    n = max(views.values(), default=0) + 1
    if n > 1 and (recipe.data.mixup > 0 or recipe.data.cutmix > 0 or recipe.data.cutmix_minmax is not None):
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' gives the peers their own views of each batch, which mixup / cutmix"
            " would mix differently", file=file, field="data.mixup" if recipe.data.mixup > 0 else "data.cutmix",
            hint="set mixup = 0 and cutmix = 0, or give every peer the same view (the strategy's views parameter)",
        )
    return views, n

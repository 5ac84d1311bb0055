"""Building a run from a recipe: strategy, data, peers, auxiliary modules, units, optimizers.

Everything that can fail on bad input is resolved here, before anything is written:
building a run creates no file and changes no process-wide state. ``check_recipe`` runs
the same checks for ``mutualkd validate``, on the CPU and without an Accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
import torch
from torch import nn

from mutualkd.config import OptimizerConfig, Recipe, SchedulerConfig
from mutualkd.config.resolve import check_strategy_fit, resolve_params
from mutualkd.data import DatasetInfo, Pipeline, build_pipeline, check_data
from mutualkd.errors import DataError, RecipeError, UserError, in_file, unknown_name_hint
from mutualkd.optim import build_optimizer, build_scheduler, check_optimizer
from mutualkd.peers import input_norm
from mutualkd.registry import get_metric
from mutualkd.engine.launcher import CompileChoice
from mutualkd._logging import get_logger
from mutualkd.engine.networks import Slot, Unit, make_networks, networks_of, peer_views, temporal_means
from mutualkd.strategy import EMA_SUFFIX, LoadedModel, PeerInfo, SetupContext, Stage, Strategy, TemporalMean
from mutualkd.weights import announce, load_network, parse_source

__all__ = ["Unit", "Slot", "Built", "resolve_strategy", "build_run", "check_recipe"]

log = get_logger(__name__)


@dataclass
class Built:
    """A run's parts, ready to train."""

    strategy: Strategy[Any]
    info: DatasetInfo
    data: Pipeline  # the loaders (train, test, val), the batch mixing, and why this pipeline
    peer_names: list[str]
    slots: dict[str, Slot]  # peer networks first, in recipe order, then auxiliary modules, then temporal means
    units: dict[str, Unit]
    stages: list[Stage]
    stage_epochs: list[int] = field(default_factory=list)
    lr_note: str | None = None  # the linear lr-scaling rule's effect, for the console
    networks: dict[str, list[str]] = field(default_factory=dict)  # network (slot) -> its peers
    means: dict[str, TemporalMean] = field(default_factory=dict)  # temporal-mean slot -> what it averages
    views: dict[str, int] = field(default_factory=dict)  # peer -> the view of the batch it sees
    num_views: int = 1
    best_keys: list[str] = field(default_factory=list)  # the outputs whose mean top-1 chooses the best epoch

    @property
    def train_loader(self) -> Any:
        return self.data.train

    @property
    def test_loader(self) -> Any:
        return self.data.test


def resolve_strategy(recipe: Recipe, recipe_file: str = "<recipe>") -> tuple[type[Strategy[Any]], Any]:
    """The recipe's strategy class and its parameters (validated when the recipe was loaded), checked against
    the recipe's peers and schedule; a RecipeError otherwise."""
    cls, params = resolve_params(recipe, recipe_file)
    check_strategy_fit(recipe, recipe_file, cls)
    return cls, params


def _strategy(cls: type[Strategy[Any]], params: Any, recipe: Recipe) -> Strategy[Any]:
    """The strategy object; frozen peer names are handed over only when there are some (older plugins)."""
    frozen = [n for n, pc in zip(recipe.network_names(), recipe.peers) if pc.frozen]
    extra: dict[str, Any] = {"frozen": frozen} if frozen else {}
    if any(pc.branches is not None for pc in recipe.peers):
        extra["networks"] = networks_of(recipe)
    return cls(params, peers=recipe.peer_names(), mode=recipe.schedule.mode, **extra)


# --------------------------------------------------------------------------- peers
def strategy_warning(message: str) -> None:
    """A strategy's ``ctx.warn``: printed as a warning on the main process (once per process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    log.warning("%s", message)


def _setup_strategy(strategy: Strategy[Any], recipe: Recipe, file: str, info: DatasetInfo, infos: Sequence[PeerInfo],
                    device: torch.device, warn: Any = None) -> SetupContext:
    warn = warn or strategy_warning
    blocked = tuple(recipe.run.block_plugins or ())

    def load_model(source: str, peer: str | int, field: str, model: str | None = None,
                   reset_head: bool = False) -> LoadedModel:
        # The architecture is the key next to the source's: strategy.teacher -> strategy.teacher_model.
        net = load_network(source, model=model, num_classes=info.num_classes, in_chans=info.in_chans, file=file,
                           field=field, arch_field=f"{field}_model", peer=peer, reset_head=reset_head)
        net.model.eval().requires_grad_(False)
        announce(net, f"{field} (frozen)")
        where = net.source.describe() if net.source else ""
        return LoadedModel(net.model, net.model_name, source=where, head_reset=net.head_reset,
                           input_norm=input_norm(info.mean, info.std, net.mean, net.std))

    def find_metric(name: str, field: str) -> Any:
        return get_metric(name, where=f"{file} [{field}]", blocked=blocked)

    setup = SetupContext(peers=infos, recipe=recipe, dataset=info, device=device, recipe_file=file,
                         load_model=load_model, find_metric=find_metric, warn=warn)
    strategy.setup(setup)
    return setup


def _attach(setup: SetupContext, recipe: Recipe, peers: Sequence[nn.Module], device: torch.device
            ) -> tuple[dict[str, Slot], dict[str, Unit], dict[str, tuple[OptimizerConfig, SchedulerConfig]]]:
    """Slots for the peer networks and the strategy's modules; the units they train in, with their configs."""
    names = recipe.network_names()
    # A frozen peer has no unit (no optimizer); its slot's unit None keeps it in eval mode.
    frozen = {n for n, pc in zip(names, recipe.peers) if pc.frozen}
    slots = {name: Slot(name, m, m, None if name in frozen else name) for name, m in zip(names, peers)}
    units = {name: Unit(name, [name], network=name) for name in names if name not in frozen}
    unit_cfg = {name: (recipe.peer_optimizer(i), recipe.peer_scheduler(i)) for i, name in enumerate(names)
                if name not in frozen}
    frozen_peers = {n for n, i, _ in recipe.peer_tables() if recipe.peers[i].frozen}
    for name, module, unit, opt_cfg, sched_cfg, trainable in setup._added:
        if name in slots or name in units:
            raise UserError(f"strategy '{recipe.strategy.name}' registers module '{name}' twice",
                            hint="this is a bug in the strategy plugin")
        if trainable and (unit in frozen or unit in frozen_peers):
            raise UserError(f"strategy '{recipe.strategy.name}' trains module '{name}' with peer '{unit}', which is"
                            " frozen", hint="this is a bug in the strategy plugin: frozen peers have no optimizer")
        module = module.to(device)
        if not trainable:
            module.eval().requires_grad_(False)
            slots[name] = Slot(name, module, module, None)
            continue
        if unit not in units:
            units[unit] = Unit(unit, [])
            unit_cfg[unit] = (opt_cfg or recipe.optimizer, sched_cfg or recipe.scheduler)
        units[unit].modules.append(name)
        slots[name] = Slot(name, module, module, unit)
    return slots, units, unit_cfg


def _stages(strategy: Strategy[Any], recipe: Recipe, units: dict[str, Unit]) -> tuple[list[Stage], list[int]]:
    stages = list(strategy.stages())
    for stage in stages:
        for st in stage.steps:
            unknown = [u for u in st.updates if u not in units]
            frozen = set(unknown) & set(getattr(strategy, "frozen", ()))
            if frozen:
                raise UserError(f"strategy '{recipe.strategy.name}' step '{st.name}' updates frozen peer(s)"
                                f" {sorted(frozen)}",
                                hint="this is a bug in the strategy plugin: its steps must update Strategy.trainable only")
            if unknown:
                raise UserError(f"strategy '{recipe.strategy.name}' step '{st.name}' updates unknown units {unknown}",
                                hint="this is a bug in the strategy plugin")
    return stages, [s.epochs if s.epochs is not None else recipe.run.epochs for s in stages]


def _check_optimizers(recipe: Recipe, file: str,
                      unit_cfg: dict[str, tuple[OptimizerConfig, SchedulerConfig]] | None = None) -> None:
    """Every optimizer name of the recipe (and of the strategy's units) known, or a RecipeError naming its field."""
    check_optimizer(recipe.optimizer, file=file, field="optimizer")
    for i, pc in enumerate(recipe.peers):
        if pc.optimizer is not None:
            check_optimizer(pc.optimizer, file=file, field=f"peers[{i}].optimizer")
    for name, (cfg, _) in (unit_cfg or {}).items():
        check_optimizer(cfg, file=file, field=f"strategy (the optimizer of unit '{name}')")


@dataclass
class _Modules:
    """What the build steps after the data make: networks, the strategy's modules, their units and stages."""

    slots: dict[str, Slot]
    units: dict[str, Unit]
    unit_cfg: dict[str, tuple[OptimizerConfig, SchedulerConfig]]
    means: dict[str, TemporalMean]
    stages: list[Stage]
    stage_epochs: list[int]
    best_keys: list[str]


def _strategy_step(recipe: Recipe, file: str) -> tuple[type[Strategy[Any]], Strategy[Any], dict[str, int], int]:
    """The strategy (class and parameters as the recipe's load resolved them) and the views of the batch it asks for."""
    cls, params = resolve_strategy(recipe, file)
    strategy = _strategy(cls, params, recipe)
    views, num_views = peer_views(strategy, recipe, file)
    return cls, strategy, views, num_views


def _module_steps(recipe: Recipe, file: str, cls: type[Strategy[Any]], strategy: Strategy[Any], info: DatasetInfo,
                  device: torch.device, *, channels_last: bool = False, warn: Any = None) -> _Modules:
    """Peers, the strategy's set-up, units, temporal means, stages and the best output, on ``device``."""
    # --- peers: timm models (probed at the data's size)
    peers, infos = make_networks(recipe, file, info, cls.needs_feature_maps, device, channels_last)
    # --- strategy set-up: auxiliary modules and the units they train with
    setup = _setup_strategy(strategy, recipe, file, info, infos, device, warn)
    slots, units, unit_cfg = _attach(setup, recipe, peers, device)
    # --- temporal means: copies of the networks a strategy averages (made before DDP wraps anything)
    means = temporal_means(strategy, recipe, file, slots)
    stages, stage_epochs = _stages(strategy, recipe, units)
    best_keys = check_best_output(recipe, file, strategy, _evaluated_names(recipe, strategy, means))
    _check_optimizers(recipe, file, unit_cfg)
    return _Modules(slots, units, unit_cfg, means, stages, stage_epochs, best_keys)


def check_recipe(recipe: Recipe, *, recipe_file: str = "<recipe>", data: bool = True) -> None:
    """Everything a run checks before training, on the CPU, writing nothing.

    The same build steps as :func:`build_run`, without an Accelerator, optimizers or
    loaders. With ``data``, the data set is checked as the run's pipeline reads it, every
    peer is built and probed with one forward pass at the data's size, and the strategy
    sets up its modules (loading a teacher).
    """
    from mutualkd.engine.tracking import check_trackers
    from mutualkd.peers import check_model_name

    cls, strategy, _, _ = _strategy_step(recipe, recipe_file)
    for i, pc in enumerate(recipe.peers):
        check_model_name(pc.model, file=recipe_file, field=f"peers[{i}]")
        if pc.weights is not None:  # the source exists and is of a known kind (loaded with the data)
            parse_source(pc.weights, where=f"{recipe_file} [peers[{i}].weights]")
    _check_optimizers(recipe, recipe_file)
    check_trackers(recipe.run.log_with, file=recipe_file)
    if not data:
        return
    try:
        info, _, _ = check_data(recipe.data, seed=recipe.run.seed, peers=_peer_models(recipe))
    except DataError as e:
        raise in_file(e, recipe_file) from None
    _module_steps(recipe, recipe_file, cls, strategy, info, torch.device("cpu"))


# --------------------------------------------------------------------------- the whole run
def _evaluated_names(recipe: Recipe, strategy: Strategy[Any], means: dict[str, TemporalMean]) -> list[str]:
    """Every output evaluated after an epoch: peers, the strategy's temporal means and declared outputs, EMA peers."""
    peers = recipe.peer_names()
    networks = networks_of(recipe)
    names = list(peers)
    names += [p + EMA_SUFFIX for m in means for p in networks[m.removesuffix(EMA_SUFFIX)]]
    names += list(strategy.outputs())
    names += [p + EMA_SUFFIX for p, i, _ in recipe.peer_tables() if recipe.peer_ema(i) is not None]
    return names + (["ensemble"] if len(peers) > 1 else [])


def check_best_output(recipe: Recipe, file: str, strategy: Strategy[Any], evaluated: Sequence[str]) -> list[str]:
    """The outputs whose mean top-1 chooses the best epoch (``run.best_output``, else the strategy's choice)."""
    asked = recipe.run.best_output
    choice = asked if asked is not None else strategy.reported_output()
    if choice is None or choice == "peers":
        return recipe.peer_names()
    if choice not in evaluated:
        if asked is None:
            raise UserError(f"strategy '{recipe.strategy.name}' reports output '{choice}', which is not evaluated",
                            hint="this is a bug in the strategy plugin")
        raise RecipeError(f"best_output = \"{asked}\" is not an output of this run", file=file, field="run.best_output",
                          hint=unknown_name_hint("output", asked, ["peers", *evaluated]))
    return [choice]


def build_run(recipe: Recipe, accelerator: Accelerator, *, recipe_file: str = "<recipe>",
              warn: Any = None, compile_with: CompileChoice | None = None) -> Built:
    """Strategy, data, peers, auxiliary modules and one optimizer per unit, prepared for training.

    ``compile_with`` (:func:`.launcher.resolve_compile`: ``run.compile`` or the launcher's
    ``dynamo_backend``) compiles each peer network once, after DistributedDataParallel.
    """
    run, acc = recipe.run, accelerator
    device = acc.device

    # --- strategy: looked up by name in the registry when the recipe was loaded, parameters validated then
    cls, strategy, views, num_views = _strategy_step(recipe, recipe_file)
    peer_names = recipe.peer_names()

    # --- data: held on the training device (device pipeline) or read by worker processes
    # (stream pipeline), see mutualkd.data.pipeline
    try:
        data = build_pipeline(recipe.data, seed=run.seed, device=device, rank=acc.process_index,
                              world_size=acc.num_processes, channels_last=run.channels_last,
                              peers=_peer_models(recipe), views=num_views)
    except DataError as e:
        raise in_file(e, recipe_file) from None
    info, train_loader = data.info, data.train

    # --- peers (identical initialisation on every process), the strategy's modules, units, stages
    set_seed(run.seed)
    mods = _module_steps(recipe, recipe_file, cls, strategy, info, device, channels_last=run.channels_last, warn=warn)
    slots, units, unit_cfg, means, stages, stage_epochs = (mods.slots, mods.units, mods.unit_cfg, mods.means,
                                                           mods.stages, mods.stage_epochs)

    # --- one optimizer (mutualkd's sgd / adamw, or timm.optim's) and one per-step schedule per unit
    steps_per_epoch = len(train_loader)
    global_batch = recipe.data.batch_size * acc.num_processes
    lr_notes: list[str] = []
    for unit in units.values():
        opt_cfg, sched_cfg = unit_cfg[unit.name]
        if opt_cfg.lr_base_batch is not None:  # the linear scaling rule (Goyal et al., 2017)
            lr = opt_cfg.lr * global_batch / opt_cfg.lr_base_batch
            lr_notes.append(f"{unit.name} lr {opt_cfg.lr:g} x {global_batch}/{opt_cfg.lr_base_batch} = {lr:g}")
            opt_cfg = opt_cfg.model_copy(update={"lr": lr})
        unit.clip = (opt_cfg.clip_grad, opt_cfg.clip_mode) if opt_cfg.clip_grad is not None else None
        unit.optimizer = build_optimizer([slots[m].inner for m in unit.modules], opt_cfg)
        epochs = sum(e for s, e in zip(stages, stage_epochs) if any(unit.name in st.updates for st in s.steps))
        unit.scheduler = build_scheduler(unit.optimizer, sched_cfg, total_epochs=max(epochs, 1),
                                         steps_per_epoch=steps_per_epoch)

    # --- devices and DistributedDataParallel through the Accelerator, for the trainable
    # modules only. Optimizers and schedules stay plain torch objects: the engine steps
    # them itself (see precision.py), each schedule once per update of its unit.
    trainable = [s for s in slots.values() if s.unit is not None]
    if run.sync_bn and acc.num_processes > 1:
        if device.type == "cpu":
            raise RecipeError("run.sync_bn needs GPUs: torch's SyncBatchNorm does not run on the CPU",
                              file=recipe_file, field="run.sync_bn", hint="set sync_bn = false for CPU runs")
        # BatchNorm statistics over the global batch. convert_sync_batchnorm keeps the
        # same Parameter and buffer objects, so the optimizers built above still hold them.
        for s in trainable:
            s.inner = nn.SyncBatchNorm.convert_sync_batchnorm(s.inner)
    if trainable:
        prepared = acc.prepare(*[s.inner for s in trainable])
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        for s, m in zip(trainable, prepared):
            s.wrapped = m
    if compile_with is not None:  # the Accelerator compiles nothing (process.py): this is the only place
        for name in recipe.network_names():
            slots[name].wrapped = compile_with.apply(slots[name].wrapped)
    return Built(strategy, info, data, peer_names, slots, units, stages, stage_epochs,
                 "; ".join(lr_notes) or None, networks_of(recipe), means, views, num_views, mods.best_keys)


def _peer_models(recipe: Recipe) -> dict[str, str]:
    """Each peer's recipe name and its timm model (for ``data.config_from``)."""
    return dict(zip(recipe.network_names(), (pc.model for pc in recipe.peers)))


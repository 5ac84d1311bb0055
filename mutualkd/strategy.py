"""The strategy contract: what a distillation strategy declares and computes.

A strategy never runs a training loop. It declares

* its parameters, as a pydantic model ``Params`` (the ``[strategy]`` table of a recipe,
  minus ``name``, is validated against it, unknown keys refused);
* the auxiliary modules it needs (autoencoders, encoders, a frozen teacher), created in
  :meth:`Strategy.setup` and attached to *units*: a unit is a set of parameters that one
  optimizer updates together. Each peer's backbone is the unit named after the peer;
* its *stages* (e.g. IE-KD trains the teacher's autoencoder first, then the student),
  each a list of :class:`Step` run in order for every mini-batch;
* for each step, :meth:`Strategy.compute` returns the named loss terms, grouped by peer:
  ``{"peer0": {"ce": tensor, "kl": tensor}}``. The engine sums them, backpropagates once,
  steps the optimizers of the step's units, and logs every term.

Peer outputs are requested by peer name through :meth:`StepContext.output`. The engine caches them:
a peer that was not updated since its last forward pass on this batch is not run again;
one that was updated is recomputed, so every step sees the current networks (that is
what makes sequential schedules faithful). The engine decides whether a forward pass
records a graph: it does when the peer will still be updated later in the batch. Targets
taken from other peers must be detached by the strategy.

Strategies never see the engine's wrappers (DistributedDataParallel, ``torch.compile``):
:meth:`StepContext.module` hands out the module as the strategy built it, and calling it
runs the forward pass through whatever wrapper the engine put around it.

Online distillation widens the contract (each piece optional, each off by default):

* **topologies**: peers are whole networks (``"independent"``) or the branches of a network
  split into a shared trunk and K branches (``"branched"``, a ``[[peers]]`` table with
  ``branches``/``split_after``). A branched network is one *unit* named after its table
  (``self.networks`` maps each unit to its peers); its trunk runs once per batch and view.
  ``topologies`` lists those a strategy accepts;
* **temporal means**: :meth:`Strategy.temporal_means` asks for an EMA copy of a peer's
  network, updated after every optimizer step of its unit with the strategy's decay; its
  peers are ``<peer>_ema``, readable in a step with ``ctx.output`` (no graph), evaluated,
  checkpointed and exportable;
* **views**: :meth:`Strategy.views` gives each peer its own augmentation of the batch's
  images (both data pipelines draw them); ``ctx.output`` feeds each peer its view;
* **declared outputs**: :meth:`Strategy.outputs` names extra predictions (a gated
  ensemble, a fused head) that :meth:`Strategy.compute_outputs` builds at evaluation;
  they are evaluated, logged and may choose ``best/`` (:meth:`Strategy.reported_output`
  is the default choice, ``run.best_output`` the recipe's);
* **per-batch updates**: ``ctx.skip_update(unit)`` leaves a unit of the step untouched on
  this batch, its optimizer state included;
* ``ctx.log(name, value)`` records a scalar (its epoch mean goes to metrics.jsonl) and
  ``ctx.warn(message)`` prints a note once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict
import torch
from torch import Tensor, nn

# The schema's leaf module: mutualkd.config itself validates a recipe's strategy through the registry,
# which checks classes against this contract.
from mutualkd.config.peers import OptimizerConfig, SchedulerConfig
from mutualkd.errors import RecipeError

if TYPE_CHECKING:
    from mutualkd.config import Recipe
    from mutualkd.data import DatasetInfo

__all__ = [
    "Strategy",
    "StrategyParams",
    "Step",
    "Stage",
    "PeerOutput",
    "PeerInfo",
    "SetupContext",
    "StepContext",
    "LossTerms",
    "LoadedModel",
    "TemporalMean",
    "OptimizerConfig",
    "SchedulerConfig",
    "RecipeError",
    "EMA_SUFFIX",
]

#: ``<peer><EMA_SUFFIX>`` names the EMA (temporal-mean) copy of a peer in steps, metrics and checkpoints.
EMA_SUFFIX = "_ema"

#: Loss terms of one step, grouped by peer name: ``{"peer0": {"ce": t, "kl": t}}``.
LossTerms = dict[str, dict[str, Tensor]]
Mode = Literal["alternating", "simultaneous"]


class StrategyParams(BaseModel):
    """Base for a strategy's parameter model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Step:
    """One update in a mini-batch.

    ``name`` is logged with every term the step produces; ``updates`` names the units
    whose optimizers step after the backward pass (a peer's name is the unit of its
    backbone and of whatever the strategy attached to it).
    """

    name: str
    updates: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """A phase of training: ``steps`` run for each batch, for ``epochs`` epochs.

    ``epochs=None`` means the recipe's ``run.epochs``. ``evaluate`` says whether the
    peers are evaluated at the end of each epoch of this stage.
    """

    name: str
    steps: tuple[Step, ...]
    epochs: int | None = None
    evaluate: bool = True


P = TypeVar("P", bound=StrategyParams)


@dataclass(frozen=True)
class PeerOutput:
    """A peer's forward pass on the current batch: feature map and logits.

    ``trunk`` is the shared trunk's output map this branch was fed (branched peers only;
    the same tensor for every branch on the same view), ``None`` for a whole network.
    """

    features: Tensor
    logits: Tensor
    trunk: Tensor | None = None


@dataclass(frozen=True)
class TemporalMean:
    """An EMA (temporal-mean) copy of the network of peer ``peer``, requested by a strategy.

    After each optimizer step of the network's unit, ``ema = d * ema + (1 - d) * net`` with
    ``d = decay(n)``, ``n`` the number of earlier updates (0 at the first: ``decay(0) = 0``
    copies the network). Parameters and floating-point buffers (BatchNorm statistics) are
    averaged; integer buffers are copied. The copy is in eval mode, has no gradient, and
    its peers are named ``<peer>_ema``.
    """

    peer: str
    decay: Callable[[int], float]


@dataclass(frozen=True)
class LoadedModel:
    """A network loaded for a strategy (e.g. a teacher): the timm model and its architecture name.

    The model is frozen (``requires_grad_(False)``) and in eval mode. ``input_norm`` is None,
    or a module that re-normalises this run's batches the way the weights expect (their
    pretrained config's mean and std): put it in front of the model, as :meth:`as_module`
    does and ``PeerModule(..., input_norm=loaded.input_norm)`` does for feature maps.
    ``head_reset``: the classifier is new and untrained (``reset_head``), so only the
    features mean anything. ``source`` says where the weights came from.
    """

    model: nn.Module
    model_name: str
    source: str = ""
    input_norm: nn.Module | None = None
    head_reset: bool = False

    def as_module(self) -> nn.Module:
        """The model behind its input normalisation: called on this run's batches, it returns logits."""
        return self.model if self.input_norm is None else nn.Sequential(self.input_norm, self.model)


@dataclass(frozen=True)
class PeerInfo:
    """What a strategy may know of a peer at set-up time."""

    index: int
    name: str
    model_name: str
    feature_shape: tuple[int, ...]  # without the batch dimension, e.g. (C, H, W)
    model: nn.Module  # the unwrapped timm model (read-only use at set-up)
    frozen: bool = False  # never trained: no unit, no optimizer (its weights came from a source)
    head_reset: bool = False  # its classifier is new and untrained (reset_head): its logits mean nothing yet
    network: str = ""  # the unit (and checkpoint module) it belongs to: its own name, or its branched network's
    branch: int | None = None  # its index among the network's branches (None: a whole network)
    trunk_shape: tuple[int, ...] | None = None  # the shared trunk's output map (C, H, W), branched peers only


@dataclass
class SetupContext:
    """Handed to :meth:`Strategy.setup`: the peers, the data set, and a way to add modules.

    The engine supplies how networks and metrics are found for this run (``load_model``,
    ``find_metric``); strategies call :meth:`load_peer` and :meth:`metric`.
    """

    peers: Sequence[PeerInfo]
    recipe: Recipe
    dataset: DatasetInfo
    device: torch.device
    recipe_file: str
    #: ``(source, peer, field, model, reset_head) -> LoadedModel``, checked against this run's data set.
    load_model: Callable[[str, str | int, str, str | None, bool], LoadedModel]
    #: ``(name, field) -> metric``, with the run's ``run.block_plugins`` applied.
    find_metric: Callable[[str, str], Any]
    #: ``(message) -> None``: a note printed once on the main process.
    warn: Callable[[str], None] = print
    _added: list[tuple[str, nn.Module, str, Any, Any, bool]] = field(default_factory=list)

    def load_peer(self, source: str, peer: str | int = 0, *, model: str | None = None, reset_head: bool = False,
                  field: str = "strategy") -> LoadedModel:
        """A frozen network (a teacher) from any weights source (docs/weights.md).

        ``source`` is a mutualkd run or checkpoint folder (``peer``: a peer name or index of
        that run), a weights file (``.safetensors``, ``.pth``, ...), a timm model folder, a
        timm pretrained tag or ``hf-hub:ORG/NAME``. ``model`` is the timm architecture: needed
        for a bare weights file, checked against the source otherwise (messages about it name the
        key ``<field>_model``, e.g. ``strategy.teacher_model``). The weights are checked
        against this recipe's data set: a classifier for other classes is refused unless
        ``reset_head``. ``field`` is the recipe key that named it (for error messages).
        """
        return self.load_model(source, peer, field, model, reset_head)

    def as_peer(self, loaded: LoadedModel) -> tuple[nn.Module, tuple[int, ...]]:
        """``loaded`` as a peer module on this run's device (its call returns ``(feature map [B, C, H, W],
        logits)``, behind its input normalisation) and the shape ``(C, H, W)`` of its map on this data."""
        from mutualkd.peers import PeerModule, probe_feature_shape

        module = PeerModule(loaded.model, loaded.model_name, feature_map=True, input_norm=loaded.input_norm)
        module = module.to(self.device)
        shape = probe_feature_shape(module, self.dataset.in_chans, self.dataset.image_size, self.device)
        return module, shape

    def metric(self, name: str, *, field: str) -> Any:
        """The distance metric plugin ``name``, looked up in the registry for this run.

        ``field`` is the recipe key that named it (for the error message). Plugins blocked
        by the recipe's ``run.block_plugins`` are refused for this run only.
        """
        return self.find_metric(name, field)

    def add_module(
        self,
        name: str,
        module: nn.Module,
        *,
        unit: str,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        trainable: bool = True,
    ) -> None:
        """Register an auxiliary module.

        ``unit`` is the optimizer group it is updated with: a peer's name (the module
        trains jointly with that peer's backbone, with the peer's optimizer) or a new
        unit name, which then gets its own optimizer built from ``optimizer`` and
        ``scheduler`` (default: the recipe's shared ones). ``trainable=False`` keeps the
        module frozen and in eval mode (e.g. a teacher loaded from a checkpoint).
        """
        self._added.append((name, module, unit, optimizer, scheduler, trainable))


class StepContext(ABC):
    """Handed to :meth:`Strategy.compute` for each step of each batch."""

    inputs: Tensor
    labels: Tensor
    epoch: int
    global_step: int
    stage: str
    #: Free per-batch storage for the strategy (cleared before each batch).
    cache: dict[str, Any]

    @abstractmethod
    def output(self, peer: str) -> PeerOutput:
        """The output of the peer named ``peer`` on this batch, from the cache while still current."""

    @abstractmethod
    def module(self, name: str) -> nn.Module:
        """The auxiliary module registered as ``name`` in :meth:`Strategy.setup`.

        Its methods and attributes are the module's own; calling it runs the forward pass
        through the engine's wrapper (so that several processes synchronise gradients).
        """

    def view(self, k: int) -> Tensor:
        """View ``k`` of the batch's images (``inputs`` is view 0); see :meth:`Strategy.views`."""
        if k == 0:
            return self.inputs
        raise IndexError(f"this batch has one view; view {k} needs Strategy.views() to ask for it")

    def skip_update(self, *units: str) -> None:
        """Leave ``units`` of the current step untouched on this batch (no optimizer step, no state change).

        Their schedules still advance with the batch. Loss terms of a skipped unit are still
        computed and logged; gradients that reach it are discarded.
        """
        raise RuntimeError("skip_update() belongs in compute(): an evaluation batch (compute_outputs) updates nothing")

    def log(self, name: str, value: float | Tensor) -> None:
        """Record a scalar for this batch (the step record, and its mean over the epoch in the epoch record)."""

    def warn(self, message: str) -> None:
        """Print ``message`` as a note, once per run (main process)."""


class Strategy(ABC, Generic[P]):
    """Base class of every distillation strategy plugin.

    Subclasses are generic in their parameter model, ``class KD(Strategy[KDParams])``:
    ``Params`` is then that model (set it explicitly to override), and ``self.params`` is
    typed as it. They set ``min_peers`` / ``max_peers`` and ``modes`` (the
    ``[schedule] mode`` values they support), and implement :meth:`steps` and
    :meth:`compute`. Register the class under the entry-point group ``mutualkd.strategies``.
    """

    Params: ClassVar[type[StrategyParams]] = StrategyParams
    min_peers: ClassVar[int] = 1
    max_peers: ClassVar[int | None] = None
    modes: ClassVar[tuple[str, ...]] = ("alternating", "simultaneous")
    #: Whether :class:`PeerOutput.features` must be a ``[B, C, H, W]`` map (see mutualkd.peers).
    needs_feature_maps: ClassVar[bool] = False
    #: Whether the recipe may freeze peers (``frozen = true``). A frozen peer has no unit: the
    #: strategy's steps must not update it (see :attr:`trainable`); its output on a batch is
    #: computed once and reused by every step (its version never changes).
    accepts_frozen: ClassVar[bool] = False
    #: The peer topologies accepted: ``"independent"`` (whole networks) and/or ``"branched"``
    #: (the branches of networks split into a shared trunk and K branches).
    topologies: ClassVar[tuple[str, ...]] = ("independent",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Params" in cls.__dict__:
            return
        for base in getattr(cls, "__orig_bases__", ()):
            args = [a for a in get_args(base) if isinstance(a, type) and issubclass(a, StrategyParams)]
            if args:
                cls.Params = args[0]
                return

    def __init__(self, params: P, *, peers: Sequence[str], mode: Mode, frozen: Sequence[str] = (),
                 networks: Mapping[str, Sequence[str]] | None = None) -> None:
        self.params: P = params
        self.peers = list(peers)
        self.mode = mode
        #: Peers the recipe froze (only when :attr:`accepts_frozen`); never in a step's ``updates``.
        self.frozen = [p for p in self.peers if p in set(frozen)]
        #: Unit (network) name -> its peers: ``{"peer0": ["peer0"]}`` for whole networks,
        #: ``{"net": ["net_b0", "net_b1", "net_b2"]}`` for a branched one.
        self.networks: dict[str, list[str]] = (
            {n: list(ps) for n, ps in networks.items()} if networks is not None else {p: [p] for p in self.peers}
        )

    def unit_of(self, peer: str) -> str:
        """The unit (network) whose optimizer updates ``peer``."""
        return next(n for n, ps in self.networks.items() if peer in ps)

    @property
    def trainable(self) -> list[str]:
        """The peers that train, in recipe order (all of them unless some are frozen)."""
        return [p for p in self.peers if p not in self.frozen]

    # ------------------------------------------------------------------ declaration
    def setup(self, ctx: SetupContext) -> None:
        """Create auxiliary modules with ``ctx.add_module`` (default: none)."""

    @abstractmethod
    def steps(self) -> Sequence[Step]:
        """The steps of one mini-batch of the main stage, in order."""

    def stages(self) -> Sequence[Stage]:
        """The stages of a run; by default one stage running :meth:`steps`."""
        return [Stage("train", tuple(self.steps()))]

    def temporal_means(self) -> Sequence[TemporalMean]:
        """EMA copies of networks the strategy reads as teachers and the engine evaluates (default: none)."""
        return ()

    def views(self) -> Mapping[str, int]:
        """Which view of the batch each peer sees: ``{peer: k}``; peers left out see view 0 (default: all)."""
        return {}

    def outputs(self) -> Sequence[str]:
        """Names of the predictions :meth:`compute_outputs` adds at evaluation (default: none)."""
        return ()

    def compute_outputs(self, ctx: StepContext) -> Mapping[str, Tensor]:
        """The logits ``[B, classes]`` of each declared output on an evaluation batch (no graph, eval mode)."""
        return {}

    def reported_output(self) -> str | None:
        """The output the method's authors report, which chooses ``best/`` unless ``run.best_output`` says
        otherwise: a peer, ``<peer>_ema`` or a declared output. None: the mean top-1 of the peers."""
        return None

    # ------------------------------------------------------------------ computation
    @abstractmethod
    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        """The loss terms of ``step``, grouped by peer name."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Strategy state that is not inside a module (saved with every checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ helpers
    @classmethod
    def describe(cls) -> str:
        """First line of the docstring, for listings."""
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]

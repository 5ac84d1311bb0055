"""EMA peers: an exponential moving average of a peer's weights, evaluated and saved next to it.

A recipe asks for them with ``[ema]`` (every peer) or ``[peers.ema]`` (one peer, over the
shared table): ``ema = { decay = 0.9998, warmup = true }``. Each is timm's
:class:`timm.utils.ModelEmaV3` of the peer's timm model (parameters and buffers), updated
after every optimizer step of the peer's unit, never in a stage that does not train the
peer (IE-KD's autoencoder stage). With warmup the ``n``-th update uses timm's
``min(decay, 1 - (1 + n) ** (-2/3))``; without, the first update copies the peer and the
later ones use ``decay``.

The copies are evaluated after each epoch next to the raw peers, as ``<peer>_ema`` in the
epoch's ``top1`` (metrics.jsonl, summary.json, the report), and left out of the ensemble,
which stays the raw peers'. They are saved in every checkpoint under
``callbacks/ema`` (weights and update counts) and restored exactly on resume;
``mutualkd export RUN --peer peer0 --ema`` writes one as a timm checkpoint.

An EMA copy is not a strategy's target: strategies see the raw peers only (the
strategy contract hands them the peers' forward passes), so KL-DML, IE-KD and IE-DML train
exactly as without EMA. A mean-teacher style method would read ``trainer.ema`` from its
own callback or declare the need in the strategy contract; mutualkd ships none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from timm.utils import ModelEmaV3
from torch import nn

from mutualkd.engine.hooks import Callback
from mutualkd.errors import CheckpointError
from mutualkd.peers import PeerModule

if TYPE_CHECKING:
    from mutualkd.engine.step import StepResult
    from mutualkd.engine.trainer import Trainer

__all__ = ["EMA_SUFFIX", "EmaPeers"]

#: ``<peer><EMA_SUFFIX>`` names a peer's EMA copy in metrics, summaries and checkpoints.
EMA_SUFFIX = "_ema"


class EmaPeers(Callback):
    """The EMA copies of a run's peers: updated after each batch, evaluated by the trainer, saved with it.

    Built by the trainer from its recipe (``Recipe.peer_ema``); registers each copy in
    ``trainer.eval_models`` as ``<peer>_ema``. Its state (``state_dict``) is saved in the
    trainer's checkpoints under ``callbacks/ema``.
    """

    state_key = "ema"

    def __init__(self, trainer: Trainer) -> None:
        self.emas: dict[str, ModelEmaV3] = {}
        self.updates: dict[str, int] = {}
        self._restored = False
        for i, name in enumerate(trainer.network_names):
            cfg = trainer.recipe.peer_ema(i)
            if cfg is None or trainer.recipe.peers[i].branches is not None:  # (refused when the recipe is built)
                continue
            peer = trainer.unwrapped(name)
            model: nn.Module = peer.model  # type: ignore[assignment]  # the timm model inside the PeerModule
            ema = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup)
            ema.module.requires_grad_(False)
            self.emas[name] = ema
            self.updates[name] = 0
            # evaluated like a peer: (features, logits) from the same timm model API
            trainer.eval_models[name + EMA_SUFFIX] = PeerModule(ema.module, peer.model_name, feature_map=False)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return bool(self.emas)

    def model(self, peer: str) -> nn.Module:
        """The EMA copy of ``peer`` (a timm model, in eval mode)."""
        return self.emas[peer].module

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.resumed_from is not None and not self._restored:
            raise CheckpointError(
                "the checkpoint holds no EMA weights, but the recipe asks for EMA peers",
                where=str(trainer.resumed_from), hint="resume with the recipe the run was started with",
            )

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        # A peer's unit carries its name; only the peers this stage trains move.
        updated = {u for st in trainer.current_stage.steps for u in st.updates}
        for name, ema in self.emas.items():
            if name not in updated:
                continue
            self.updates[name] += 1
            ema.update(trainer.unwrapped(name).model, step=self.updates[name])  # type: ignore[arg-type]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {name: {"module": ema.module.state_dict(), "updates": self.updates[name]}
                for name, ema in self.emas.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.emas) - set(state))
        if missing:
            raise CheckpointError(f"the checkpoint has no EMA weights for peer(s) {', '.join(missing)}",
                                  hint="resume with the recipe the run was started with")
        for name, ema in self.emas.items():
            ema.module.load_state_dict(state[name]["module"])
            self.updates[name] = int(state[name]["updates"])
        self._restored = True

"""``mutualkd export``: one peer (or its EMA copy) of a saved run as a timm checkpoint.

The export is a folder with ``model.safetensors`` (the timm model's ``state_dict``) and
``config.json`` (architecture, ``num_classes``, ``in_chans``, the peer's ``kwargs`` and
where it came from), which timm loads without mutualkd::

    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                              in_chans=cfg["in_chans"], **cfg["kwargs"], pretrained=True,
                              pretrained_cfg_overlay={"file": "OUT/model.safetensors"})
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Any

from mutualkd.errors import CheckpointError, UserError, unknown_name_hint

__all__ = ["Exported", "export_peer"]


@dataclass
class Exported:
    """What :func:`export_peer` wrote."""

    folder: Path
    peer: str
    architecture: str
    ema: bool
    checkpoint: Path


def export_peer(run_or_checkpoint: str | Path, out: str | Path, *, peer: str | None = None, ema: bool = False,
                best: bool = False) -> Exported:
    """Write peer ``peer`` (default: the first) of a run's latest checkpoint (or ``best/``) to ``out``."""
    from safetensors.torch import save_file

    from mutualkd import checkpoint as ckpt

    src = Path(run_or_checkpoint)
    if best:
        src = src / "checkpoints" / "best" if (src / "checkpoints").is_dir() else src
        if not ckpt.is_complete(src):
            raise CheckpointError("the run has no complete best/ checkpoint", where=str(src),
                                  hint="export the latest checkpoint (leave out --best)")
    folder = ckpt.resolve_checkpoint(src, where=str(run_or_checkpoint))
    meta = ckpt.read_meta(folder)
    peers: dict[str, Any] = meta.get("peers", {})
    name = peer or next(iter(peers), "")
    if name not in peers:
        raise UserError(f"the run has no peer {name!r}", where=str(folder), hint=unknown_name_hint("peer", name, list(peers)))
    state = ckpt.load_checkpoint(folder)
    if ema:
        saved = state.get("callbacks", {}).get("ema", {})
        if name not in saved:
            have = ", ".join(saved) or "none"
            raise UserError(f"peer '{name}' has no EMA copy in this checkpoint (EMA peers: {have})", where=str(folder),
                            hint="train with [ema] (or [peers.ema]) in the recipe, or export without --ema")
        weights = saved[name]["module"]
    else:
        weights = state["modules"][name]
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError("the export folder exists and is not empty", where=str(out_dir),
                        hint="choose another --out, or remove the folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    ds = meta.get("dataset", {})
    config = {
        "architecture": peers[name]["model"],
        "num_classes": ds.get("num_classes"),
        "in_chans": ds.get("in_chans"),
        "kwargs": peers[name].get("kwargs", {}),
        "source": {"checkpoint": str(folder), "peer": name, "ema": ema, "global_step": meta.get("global_step"),
                   "dataset": ds.get("name"), "strategy": meta.get("strategy")},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Exported(out_dir, name, config["architecture"], ema, folder)

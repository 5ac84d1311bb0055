"""Checkpoints that are never half-written.

A checkpoint is a folder holding ``state.pt`` (everything needed to continue),
``meta.json`` (what it is: step, epoch, stage, versions, recipe hash) and, written last,
the marker ``COMPLETE``. It is written into a temporary folder next to its destination
and renamed into place, so a crash at any moment leaves either the old checkpoint or the
new one. Folders without the marker are ignored; nothing parses folder names: the step a
checkpoint belongs to is read from its ``meta.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import io
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

import torch

from mutualkd.config import LOGGING_ONLY_FIELDS
from mutualkd.errors import CheckpointError

__all__ = [
    "MARKER",
    "save_checkpoint",
    "load_checkpoint",
    "is_complete",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "recipe_hash",
    "versions",
    "load_peer_model",
]

MARKER = "COMPLETE"
STATE = "state.pt"
META = "meta.json"


def versions() -> dict[str, str]:
    import timm

    import mutualkd

    return {"mutualkd": mutualkd.__version__, "torch": torch.__version__, "timm": timm.__version__}


#: ``[run]`` fields a resume may change: the logging-only ones, and ``max_steps``, which
#: changes where a run stops but not the steps before it, so a run stopped by it can be
#: continued with a larger one.
RESUME_MAY_CHANGE: tuple[str, ...] = (*LOGGING_ONLY_FIELDS, "max_steps")


def recipe_hash(recipe_dict: Mapping[str, Any]) -> str:
    """A hash of the parts of a recipe that change what training computes (all but :data:`RESUME_MAY_CHANGE`)."""
    relevant = {k: v for k, v in recipe_dict.items() if k != "run"}
    run = dict(recipe_dict.get("run", {}))
    for k in RESUME_MAY_CHANGE:
        run.pop(k, None)
    relevant["run"] = run
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(dest: Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write a checkpoint folder at ``dest`` atomically (replacing one already there)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        with open(tmp / STATE, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        (tmp / META).write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str))
        with open(tmp / MARKER, "w") as f:
            f.write(hashlib.sha256(buf.getbuffer()).hexdigest() + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if dest.exists():
            # Swap: the old folder is renamed aside first, so at every instant one
            # complete checkpoint exists under a known name or its aside name.
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / STATE).is_file() and (Path(path) / META).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {META}: {e}", where=str(path), hint="use another checkpoint") from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load ``state.pt`` of a complete checkpoint, checking it against its marker's hash."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", where=str(path), hint="check the path (a run folder or a checkpoint folder)")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint is incomplete (no {MARKER} marker or missing files); it was interrupted while being written",
            where=str(path),
            hint="use an older complete checkpoint of the run",
        )
    data = (path / STATE).read_bytes()
    if verify:
        expected = (path / MARKER).read_text().strip()
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(
                f"{STATE} is corrupted (its hash does not match the one recorded when it was written)",
                where=str(path),
                hint="use an older complete checkpoint of the run",
            )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{STATE} cannot be read: {type(e).__name__}: {e}", where=str(path), hint="use another checkpoint") from None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under ``folder``, as (global step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.is_dir() and not p.name.startswith(".") and is_complete(p):
            try:
                meta = read_meta(p)
            except CheckpointError:
                continue
            if meta.get("kind") == "step":
                out.append((int(meta.get("global_step", -1)), p))
    return sorted(out)


def latest_checkpoint(folder: Path) -> Path | None:
    cks = list_checkpoints(folder)
    return cks[-1][1] if cks else None


def remove_leftovers(folder: Path) -> None:
    """Delete ``.tmp-*`` / ``.old-*`` folders that a kill during a checkpoint write left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete step checkpoints (call after a save)."""
    cks = list_checkpoints(folder)
    for _, p in cks[: max(len(cks) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: Path, where: str | None = None) -> Path:
    """A checkpoint folder, given itself or the run folder holding it (latest complete one)."""
    path = Path(path)
    if (path / META).exists() or (path / STATE).exists():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise CheckpointError(
            f"no complete checkpoint at {path}",
            where=where,
            hint="name a run folder of an earlier mutualkd run, or one of its checkpoints/ folders",
        )
    return latest


def load_peer_model(
    path: str | Path, peer: str | int, *, num_classes: int, in_chans: int, where: str | None = None
) -> tuple[torch.nn.Module, str]:
    """Rebuild peer ``peer`` (name or index) of a saved run and load its weights (eval, frozen).

    Returns the timm model and its architecture name.
    """
    from mutualkd.errors import unknown_name_hint
    from mutualkd.peers import create_peer

    folder = resolve_checkpoint(Path(path), where)
    meta = read_meta(folder)
    peers = meta.get("peers", {})
    names = list(peers)
    name = names[peer] if isinstance(peer, int) and 0 <= peer < len(names) else str(peer)
    if name not in peers:
        raise CheckpointError(
            f"the run in {folder} has no peer {peer!r}", where=where, hint=unknown_name_hint("peer", str(peer), names)
        )
    ds = meta.get("dataset", {})
    if ds.get("num_classes") != num_classes or ds.get("in_chans") != in_chans:
        raise CheckpointError(
            f"peer '{name}' of {folder} was trained on {ds.get('name')} with {ds.get('num_classes')} classes and"
            f" {ds.get('in_chans')} channels; this recipe's data has {num_classes} classes and {in_chans} channels",
            where=where,
            hint="use a teacher trained on the same data set",
        )
    spec = peers[name]
    model = create_peer(spec["model"], num_classes=num_classes, in_chans=in_chans, kwargs=spec.get("kwargs", {}))
    state = load_checkpoint(folder)
    try:
        model.load_state_dict(state["modules"][name])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"the weights of peer '{name}' do not fit model '{spec['model']}': {str(e)[:300]}",
            where=where,
            hint="the checkpoint is of another architecture; name the right run or peer",
        ) from None
    model.eval().requires_grad_(False)
    return model, spec["model"]

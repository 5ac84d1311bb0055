"""Checkpoints that are never half-written.

A checkpoint is a folder holding ``state.pt`` (everything needed to continue),
``meta.json`` (what it is: step, epoch, stage, versions, recipe hash) and, written last,
the marker ``COMPLETE``. It is written into a temporary folder next to its destination
and renamed into place, so a crash at any moment leaves either the old checkpoint or the
new one. Folders without the marker are ignored; nothing parses folder names: the step a
checkpoint belongs to is read from its ``meta.json``.

The marker holds the SHA-256 of ``state.pt``; a marker without one (empty, truncated)
makes the checkpoint incomplete. Replacing a checkpoint renames the old folder aside
(``.old-<name>-<pid>``) before the new one (``.tmp-<name>-*``) takes its name; a kill
between the two renames leaves both, and :func:`restore_leftovers` puts the newest
complete one back under its name instead of deleting them.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import io
import json
import os
from pathlib import Path
import re
import shutil
import tempfile
from typing import Any

import torch

from mutualkd.config import LOGGING_ONLY_FIELDS
from mutualkd.errors import CheckpointError, UserError, os_reason
from mutualkd.trust import safe_load

__all__ = [
    "MARKER",
    "save_checkpoint",
    "load_checkpoint",
    "is_complete",
    "checkpoint_problem",
    "verify_checkpoint",
    "list_checkpoints",
    "scan_checkpoints",
    "restore_leftovers",
    "latest_checkpoint",
    "prune_checkpoints",
    "recipe_hash",
    "versions",
]

MARKER = "COMPLETE"
STATE = "state.pt"
META = "meta.json"
#: Prefixes of the folders a checkpoint write uses next to its destination.
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_HASH = re.compile(r"[0-9a-f]{64}")


def versions() -> dict[str, str]:
    import timm

    import mutualkd

    return {"mutualkd": mutualkd.__version__, "torch": torch.__version__, "timm": timm.__version__}


#: ``[run]`` fields a resume may change: the logging-only ones; ``max_steps``, which
#: changes where a run stops but not the steps before it, so a run stopped by it can be
#: continued with a larger one; and ``threads``, which the machine a run continues on may
#: need (the environment sets the count as well, so the recipe's value cannot pin it).
RESUME_MAY_CHANGE: tuple[str, ...] = (*LOGGING_ONLY_FIELDS, "max_steps", "threads")


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
    """Write a checkpoint folder at ``dest`` atomically (replacing one already there).

    A failure to write (a full disk, a read-only file system) is a :class:`CheckpointError`
    naming ``dest``; the checkpoint that was there, and every other one, is kept.
    """
    dest = Path(dest)
    old = dest.with_name(f"{OLD_PREFIX}{dest.name}-{os.getpid()}")
    tmp: Path | None = None
    moved_aside = False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent))
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        with open(tmp / STATE, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        # ``folder`` names the destination, so that the leftovers of an interrupted swap are
        # put back under their name without parsing folder names.
        with open(tmp / META, "w", encoding="utf-8") as f:
            f.write(json.dumps({**meta, "folder": dest.name}, indent=2, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / MARKER, "w") as f:
            f.write(hashlib.sha256(buf.getbuffer()).hexdigest() + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if dest.exists():
            # Swap: the old folder is renamed aside first, so at every instant one
            # complete checkpoint exists under its name or its aside name.
            os.replace(dest, old)
            moved_aside = True
        os.replace(tmp, dest)
        tmp = None
        moved_aside = False
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(dest.parent)
    except BaseException as e:
        if moved_aside and not dest.exists():
            try:
                os.replace(old, dest)  # the write failed after the old one was set aside: put it back
            except OSError:
                pass  # left as .old-*; restore_leftovers puts it back on resume
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(
                f"cannot write checkpoint {dest.name}: {os_reason(e)}; the earlier checkpoints are kept",
                where=str(dest.parent),
                hint="free space on that disk (or move the run folder to a disk with room),"
                " then continue with `mutualkd run --resume RUN_DIR`",
            ) from None
        raise
    return dest


def marker_hash(path: Path) -> str | None:
    """The SHA-256 recorded in ``path``'s marker, or None when there is no valid one."""
    try:
        text = (Path(path) / MARKER).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return text if _HASH.fullmatch(text) else None


def is_complete(path: Path) -> bool:
    """The marker holds a hash and both other files are there (the hash itself is checked on load)."""
    p = Path(path)
    return (p / STATE).is_file() and (p / META).is_file() and marker_hash(p) is not None


#: meta.json fields and the type each must have when present.
_META_TYPES: dict[str, type] = {
    "kind": str,
    "global_step": int,
    "epoch": int,
    "stage": str,
    "recipe_hash": str,
    "num_processes": int,
    "peers": dict,
    "dataset": dict,
    "strategy": str,
    "versions": dict,
    "folder": str,
}
_META_REQUIRED = ("kind", "global_step")


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, its fields checked for type; a CheckpointError naming the file otherwise."""
    file = Path(path) / META
    fix = "use another checkpoint of the run"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {META}: {e}", where=str(path), hint=fix) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{META} holds a JSON {type(meta).__name__}, not an object", where=str(file), hint=fix)
    for key in _META_REQUIRED:
        if key not in meta:
            raise CheckpointError(f"{META} has no field '{key}'", where=str(file), hint=fix)
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(
                f"{META} field '{key}' is {type(value).__name__} {json.dumps(value)[:60]}, expected {kind.__name__}",
                where=str(file), hint=fix,
            )
    peers = meta.get("peers", {})
    if not all(isinstance(v, dict) and isinstance(v.get("model"), str) and isinstance(v.get("kwargs", {}), dict)
               for v in peers.values()):
        raise CheckpointError(f"{META} field 'peers' must map each peer to {{model, kwargs}}", where=str(file), hint=fix)
    return meta


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint folder (without reading ``state.pt``), or None."""
    p = Path(path)
    for name in (STATE, META):
        if not (p / name).is_file():
            return f"no {name}"
    if not (p / MARKER).is_file():
        return f"no {MARKER} marker (interrupted while being written)"
    if marker_hash(p) is None:
        return f"its {MARKER} marker holds no SHA-256 of {STATE} (an empty or damaged marker)"
    try:
        read_meta(p)
    except CheckpointError as e:
        return e.message
    return None


def _read_verified(path: Path) -> tuple[bytes | None, str | None]:
    """``state.pt``'s bytes if they match the marker's hash, else (None, why not)."""
    try:
        data = (Path(path) / STATE).read_bytes()
    except OSError as e:
        return None, f"{STATE} cannot be read: {os_reason(e)}"
    if hashlib.sha256(data).hexdigest() != marker_hash(path):
        return None, f"{STATE} is corrupted (its hash does not match the one recorded when it was written)"
    return data, None


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be loaded (its files, or ``state.pt`` against its hash), or None."""
    return checkpoint_problem(path) or _read_verified(path)[1]


OLDER_HINT = "resume from an older checkpoint of the run: mutualkd run --resume RUN_DIR/checkpoints/<folder>"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load ``state.pt`` of a complete checkpoint, checking it against its marker's hash."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", where=str(path), hint="check the path (a run folder or a checkpoint folder)")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint is incomplete: {checkpoint_problem(path)}; it was interrupted while being written, or damaged",
            where=str(path), hint=OLDER_HINT,
        )
    if verify:
        data, problem = _read_verified(path)
        if data is None:
            raise CheckpointError(problem or f"{STATE} cannot be read", where=str(path), hint=OLDER_HINT)
    else:
        data = (path / STATE).read_bytes()

    try:
        # Never full unpickling: a state.pt that asks to run code is refused (mutualkd.trust).
        state = safe_load(data, file=path / STATE, map_location=map_location)
    except UserError:
        raise
    except Exception as e:
        raise CheckpointError(f"{STATE} cannot be read: {type(e).__name__}: {e}", where=str(path), hint=OLDER_HINT) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{STATE} holds a {type(state).__name__}, not a checkpoint", where=str(path), hint=OLDER_HINT)
    return state


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under ``folder``, as (global step, path), oldest first."""
    return scan_checkpoints(folder)[0]


def scan_checkpoints(folder: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """Step checkpoints under ``folder``: the complete ones (oldest first), and the others with the reason.

    Folders whose name starts with a dot (a write in progress, one set aside) are not looked at.
    """
    folder = Path(folder)
    good: list[tuple[int, Path]] = []
    bad: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return good, bad
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        problem = checkpoint_problem(p)
        if problem is not None:
            bad.append((p, problem))
            continue
        meta = read_meta(p)
        if meta["kind"] == "step":
            good.append((meta["global_step"], p))
    return sorted(good), bad


def latest_checkpoint(folder: Path) -> Path | None:
    cks = list_checkpoints(folder)
    return cks[-1][1] if cks else None


def _leftover_name(p: Path) -> str | None:
    """The checkpoint a ``.tmp-*`` / ``.old-*`` folder was written for: its meta.json says, else its name."""
    try:
        name = json.loads((p / META).read_text(encoding="utf-8")).get("folder")
        if isinstance(name, str) and name and "/" not in name and not name.startswith("."):
            return name
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        if p.name.startswith(prefix) and "-" in p.name[len(prefix):]:
            return p.name[len(prefix):].rsplit("-", 1)[0]  # no meta.json yet: .tmp-<name>-<suffix>
    return None


def restore_leftovers(folder: Path) -> list[str]:
    """Clean up after checkpoint writes that a kill interrupted, keeping the newest complete checkpoint.

    For each destination with leftovers, the newest complete one of them is kept under its
    name: a ``.tmp-*`` that was written to the end (a kill came before or between the renames
    of its swap), else the destination itself, else the ``.old-*`` it was replacing; the
    rest go. Returns one line per checkpoint put in place, for the console. Interrupted
    again, it is interrupted between the same renames, and the next call finishes it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
            name = _leftover_name(p)
            if name is None:
                shutil.rmtree(p, ignore_errors=True)
            else:
                groups.setdefault(name, []).append(p)
    notes: list[str] = []
    for name, paths in groups.items():
        dest = folder / name
        tmps = [p for p in paths if p.name.startswith(TMP_PREFIX) and verify_checkpoint(p) is None]
        olds = [p for p in paths if p.name.startswith(OLD_PREFIX) and verify_checkpoint(p) is None]
        chosen = tmps[0] if tmps else None
        if chosen is None and not (dest.exists() and verify_checkpoint(dest) is None):
            chosen = olds[0] if olds else None
        if chosen is not None:
            if dest.exists():
                if verify_checkpoint(dest) is None:
                    os.replace(dest, dest.with_name(f"{OLD_PREFIX}{name}-{os.getpid()}"))  # as the swap does
                else:
                    set_aside(dest)  # damaged: kept for a look
            os.replace(chosen, dest)
            notes.append(f"{name} put in place from {chosen.name}, left by a checkpoint write that was interrupted")
        for p in folder.iterdir():
            if p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and _leftover_name(p) == name:
                shutil.rmtree(p, ignore_errors=True)
    if groups:
        _fsync_dir(folder)
    return notes


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that cannot be used out of the way (``.invalid-<name>-<pid>``), keeping it."""
    path = Path(path)
    aside = path.with_name(f".invalid-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def prune_checkpoints(folder: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest ``keep`` complete step checkpoints (call after a save).

    With ``upto`` (the step just saved) only checkpoints up to it count: those after it, left
    by a run resumed from an older checkpoint, stay until the run writes them again.
    """
    cks = [(step, p) for step, p in list_checkpoints(folder) if upto is None or step <= upto]
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


def peer_weights(state: Mapping[str, Any], spec: Mapping[str, Any], name: str, *, mean: bool = False
                 ) -> dict[str, Any] | None:
    """Peer ``name``'s timm state dict from a checkpoint's state (``spec``: its entry in meta.json's peers).

    A whole network's weights are the module named after it; a branch's are assembled from
    its branched network's (the shared trunk and its own modules). ``mean``: the strategy's
    temporal mean (EMA copy) of it instead. None when the checkpoint holds no such weights.
    """
    from mutualkd.branching import branch_state_dict

    key = spec.get("mean_module") if mean else spec.get("network", name)
    weights = state.get("modules", {}).get(key) if key is not None else None
    if not isinstance(weights, Mapping):
        return None
    if spec.get("branch") is not None:
        return branch_state_dict(weights, int(spec["branch"]))
    return dict(weights)

"""``mutualkd convert-checkpoint``: rewrite a trusted checkpoint so that it loads under the unpickling policy.

A checkpoint from a version of mutualkd that wrote other objects, or from a script that added
some, is refused by :func:`mutualkd.trust.safe_load`. After its owner confirms they trust it,
:func:`convert_checkpoint` loads it once with full unpickling, keeps only plain values (paths
become strings, NumPy scalars numbers, namespaces dicts) and rewrites it as an atomic
checkpoint that then loads safely.

This module sits above :mod:`mutualkd.checkpoint` (which reads through the policy in
:mod:`mutualkd.trust`); nothing below imports it.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
import io
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.errors import CheckpointError, UserError
from mutualkd.trust import UnsafeFileError, safe_load, unsafe_globals

__all__ = ["convert_checkpoint", "plain"]


def plain(obj: Any, where: str = "state") -> Any:
    """``obj`` with only what :func:`safe_load` reads back: tensors, numbers, strings, containers, NumPy arrays.

    Paths become strings, NumPy scalars Python numbers, ``argparse.Namespace`` a dict; anything
    else is a UserError naming where in the state it is.
    """
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor, torch.Size,
                                       torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj.tolist())]
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise UserError(f"cannot convert a {type(obj).__module__}.{type(obj).__qualname__} at {where}",
                    hint="this object is not part of a mutualkd checkpoint; convert it by hand or delete the checkpoint")


def _checkpoint_folders(path: Path) -> list[Path]:
    """The checkpoint folders ``path`` names: itself, or those of a run (or its checkpoints/ folder)."""
    if (path / ckpt.STATE).is_file():
        return [path]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / ckpt.STATE).is_file()) \
        if folder.is_dir() else []
    if not found:
        raise CheckpointError("no checkpoint here", where=str(path),
                              hint="name a run folder or one of its checkpoints/ folders")
    return found

def convert_checkpoint(path: str | Path) -> list[tuple[Path, str]]:
    """Rewrite every checkpoint under ``path`` (a run or checkpoint folder) so that it loads safely.

    Call only for files the user trusts: a checkpoint that does not load safely is unpickled in
    full (which runs whatever it holds). Its hash is checked first; the rewrite is atomic
    (:func:`mutualkd.checkpoint.save_checkpoint`). Returns ``(folder, what was done)`` pairs.
    """
    done: list[tuple[Path, str]] = []
    for folder in _checkpoint_folders(Path(path)):
        problem = ckpt.verify_checkpoint(folder)
        if problem is not None:
            raise CheckpointError(f"cannot convert: {problem}", where=str(folder), hint="convert a complete checkpoint")
        data = (folder / ckpt.STATE).read_bytes()
        try:
            safe_load(data, file=folder / ckpt.STATE)
            done.append((folder, "already loads safely; left as it is"))
            continue
        except UnsafeFileError:
            pass
        names = unsafe_globals(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # trusted by the user
        converted = plain(state)
        meta = {k: v for k, v in ckpt.read_meta(folder).items() if k != "folder"}
        ckpt.save_checkpoint(folder, converted, meta)
        safe_load((folder / ckpt.STATE).read_bytes(), file=folder / ckpt.STATE)  # it reads back safely now
        done.append((folder, f"converted ({', '.join(names) or 'no foreign globals'} replaced by plain values)"))
    return done

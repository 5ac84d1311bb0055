"""What mutualkd unpickles: nothing that can run code.

Weights travel as safetensors, and every pickle mutualkd reads (a checkpoint's ``state.pt``,
a ``.pth`` weights file) is read with ``torch.load(weights_only=True)``: torch's restricted
unpickler builds tensors, numbers, strings and containers only. The one addition mutualkd
allows is what it writes itself besides those: NumPy's random-generator state, a tuple
holding one ``uint32`` array (:data:`SAFE_GLOBALS`). A file that asks for anything else
(a class, a function such as ``os.system``) is refused before any of it runs, with an
:class:`UnsafeFileError` naming the file and the globals it asks for.

Data files that are pickles (CIFAR's ``data_batch_*``, ``test_batch``, ``batches.meta``, and
CIFAR-100's ``train``, ``test``, ``meta``) are read by :func:`load_data_pickle`, a
:class:`pickle.Unpickler` whose ``find_class`` admits only what those files hold besides
dicts, lists, strings, bytes and numbers: NumPy arrays, dtypes and scalars
(:data:`DATA_PICKLE_GLOBALS`). Any other global is refused before it is called.

A checkpoint from a version of mutualkd that wrote other objects, or from a script that
added some, can be converted after its owner confirms they trust it:
``mutualkd convert-checkpoint PATH`` loads it once with full unpickling, keeps only plain
values (paths become strings, NumPy scalars numbers, namespaces dicts) and rewrites it as an
atomic checkpoint that then loads safely.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
import io
from pathlib import Path, PurePath
import pickle
from typing import Any

import numpy as np
import torch

from mutualkd.errors import CheckpointError, UserError

__all__ = ["UnsafeFileError", "SAFE_GLOBALS", "DATA_PICKLE_GLOBALS", "safe_load", "load_data_pickle", "unsafe_globals",
           "convert_checkpoint", "plain"]


class UnsafeFileError(UserError):
    """A file holds pickled objects whose unpickling could run code; it was not loaded.

    Not a :class:`~mutualkd.errors.CheckpointError` on purpose: a resume skips a damaged
    checkpoint for an older one, but a checkpoint that asks to run code is refused outright.
    """


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # NumPy 2 moved numpy.core to numpy._core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


#: Globals a checkpoint may name besides torch's own: NumPy's RNG state (``np.random.get_state()``).
SAFE_GLOBALS: list[Any] = _numpy_globals()


def unsafe_globals(data: bytes) -> list[str]:
    """The globals a torch pickle names that torch's restricted unpickler would refuse (read, never run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:
        return []


def convert_hint(path: Path) -> str:
    return (f"if you wrote this checkpoint yourself (an earlier mutualkd version, your own callback) and trust it,"
            f" convert it once: mutualkd convert-checkpoint {path}; otherwise delete it")


def safe_load(data: bytes, *, file: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``data`` (the bytes of ``file``), allowing :data:`SAFE_GLOBALS`.

    Raises :class:`UnsafeFileError` naming ``file`` when the pickle asks for anything else.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        names = unsafe_globals(data)
        listed = f" ({', '.join(names[:6])})" if names else ""
        raise UnsafeFileError(
            f"{file} holds pickled objects that mutualkd never writes{listed}; unpickling them could run code, so the"
            " file is not loaded",
            hint=convert_hint(file.parent),
        ) from None


# --------------------------------------------------------------------------- data pickles
def _latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 only, no other codec looked up."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _data_pickle_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    names: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                         ("_codecs", "encode"): _latin1}
    # Pickles written under NumPy 1 name numpy.core, under NumPy 2 numpy._core: the same functions.
    for module in ("numpy.core", "numpy._core"):
        names[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        names[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        names[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return names


#: The globals a data pickle may name, by (module, name): NumPy's array, dtype and scalar
#: reconstruction, and the latin-1 encoding protocol-2 pickles of ``bytes`` use.
DATA_PICKLE_GLOBALS: dict[tuple[str, str], Any] = _data_pickle_globals()


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, f: Any) -> None:
        super().__init__(f, encoding="bytes")  # CIFAR's files are Python 2 pickles: their str are bytes
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        found = DATA_PICKLE_GLOBALS.get((module, name))
        if found is None:
            self.refused.append(f"{module}.{name}")
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_data_pickle(path: Path, *, fix: str, what: str = "pickle") -> Any:
    """Unpickle the data file ``path`` admitting only :data:`DATA_PICKLE_GLOBALS`; never runs other code.

    Raises :class:`UnsafeFileError` naming the file and the first global refused, and
    :class:`~mutualkd.errors.DataError` when the file cannot be read or is not a pickle.
    """
    from mutualkd.errors import DataError

    try:
        with open(path, "rb") as f:
            unpickler = _DataUnpickler(f)
            try:
                return unpickler.load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
                    KeyError, MemoryError, RecursionError, UnicodeDecodeError) as e:
                if unpickler.refused:
                    raise UnsafeFileError(
                        f"{path} asks to call {unpickler.refused[0]} while it is read; a data file holds arrays,"
                        " lists and numbers only, and calling anything else could run code, so it is not read",
                        hint=f"{fix} (do not use files of unknown origin)",
                    ) from None
                raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:200]})",
                                hint=fix) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})", hint=fix) from None


# --------------------------------------------------------------------------- conversion
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
    from mutualkd import checkpoint as ckpt

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
    from mutualkd import checkpoint as ckpt

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

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

This module is the policy only, and sits at the bottom of the package: it imports nothing of
mutualkd but the errors. Converting a checkpoint that breaks the policy (its owner trusts it) is
``mutualkd convert-checkpoint``, in :mod:`mutualkd.convert`, above :mod:`mutualkd.checkpoint`.
"""

from __future__ import annotations

import io
from pathlib import Path
import pickle
from typing import Any

import numpy as np
import torch

from mutualkd.errors import DataError, UserError

__all__ = ["UnsafeFileError", "SAFE_GLOBALS", "DATA_PICKLE_GLOBALS", "safe_load", "load_data_pickle", "unsafe_globals",
           "convert_hint"]


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
    """The fix for a checkpoint folder ``path`` that :func:`safe_load` refused."""
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

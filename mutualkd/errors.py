"""Errors that reach the user as a message and an exit code, never as a traceback.

Every error a user can fix by editing a recipe, a path or a command line is a
:class:`UserError`; the CLI prints it and exits with :data:`EXIT_BAD_INPUT`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import difflib
import errno

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_NON_FINITE",
    "UserError",
    "RecipeError",
    "DataError",
    "PluginError",
    "CheckpointError",
    "NonFiniteLossError",
    "close_matches",
    "unknown_name_hint",
    "in_file",
    "os_reason",
]

#: Exit code for input the user has to fix (recipe, data, paths, command line).
EXIT_BAD_INPUT = 2
#: Exit code when training diverged (a loss term became NaN or Inf).
EXIT_NON_FINITE = 3


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``known`` that look like ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, sorted(known), n=n, cutoff=0.5)


def unknown_name_hint(kind: str, name: str, known: Sequence[str], *, label: str | None = None,
                      max_shown: int = 30, list_matched: bool = True) -> str:
    """A one-paragraph hint for an unknown name: close matches first, then everything known.

    The one "did you mean" of mutualkd: plugin names, recipe keys, a strategy's parameters.
    ``label`` names the list (default ``known <kind> names``; e.g. ``known keys``); more
    than ``max_shown`` known names are counted instead of listed; ``list_matched=False``
    lists them only when nothing is close.
    """
    matches = close_matches(name, known)
    parts = []
    if matches:
        parts.append("did you mean " + " or ".join(repr(m) for m in matches) + "?")
        if not list_matched:
            return parts[0]
    shown = sorted(known)
    if len(shown) > max_shown:
        parts.append(f"{len(shown)} {kind} names are known")
    elif label is None:
        parts.append(f"known {kind} names: " + (", ".join(shown) if shown else "(none installed)"))
    else:
        parts.append(f"{label}: " + (", ".join(shown) if shown else "(none)"))
    return "; ".join(parts)


class UserError(Exception):
    """Something the user can fix. ``where`` says where (file and field), ``hint`` how.

    ``field`` is the recipe's TOML path the error is about (``"data.batch_size"``), for code
    that knows the field but not the recipe file; :func:`in_file` adds the file at the
    recipe boundary. Until then the message reads ``[data.batch_size]: ...``.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        hint: str | None = None,
        field: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint
        self.field = field

    def __str__(self) -> str:
        where = self.where or (f"[{self.field}]" if self.field else None)
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


def in_file(err: UserError, file: str) -> UserError:
    """Place an error about a recipe field in the recipe ``file``: ``<file> [<field>]: ...``.

    An error that already says where it is (a data file, a run folder) or names no field
    is returned as it is.
    """
    if err.field and err.where is None:
        err.where = f"{file} [{err.field}]"
    return err


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        where = None
        if file and field:
            where = f"{file} [{field}]"
        elif file or field:
            where = file or f"[{field}]"
        super().__init__(message, where=where, hint=hint)
        self.file = file
        self.field = field


class DataError(UserError):
    """A data set that is missing, incomplete or malformed, or a ``[data]`` field that does not fit it.

    Raised for a recipe field, it carries the field (``DataError(msg, field="data.root")``);
    raised for a data file, its message names the file.
    """


class PluginError(UserError):
    """A plugin that is unknown, duplicated or broken."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the recipe."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or Inf; training stops on every process."""

    exit_code = EXIT_NON_FINITE


def os_reason(e: OSError) -> str:
    """``strerror (ENAME)`` of an OSError, e.g. ``No space left on device (ENOSPC)``."""
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e} ({name})" if name else str(e.strerror or e)

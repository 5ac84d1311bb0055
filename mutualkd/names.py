"""Names that become paths: one folder or file name, printable, bounded, never a look-alike.

A run's name, a peer's name, the trackers' project and a sweep's run names each end up as
one path component (``runs/<run.name>``, ``OUT/<peer>`` of ``mutualkd export``,
``tracking/<project>``). :func:`name_problem` says why a value cannot be one; the recipe's
validators call it once, when the recipe is loaded. Two names that look alike (the same
after NFKC normalisation and case folding: ``peer0`` and ``ＰＥＥＲ0``) are refused as
duplicates by :func:`look_alikes`, since they would be one folder on a case-insensitive
file system and two indistinguishable columns in a report.

Writers also check, with :func:`inside`, that the path they are about to write resolves
under the folder it belongs to, so a name read from a file mutualkd did not validate (a
checkpoint's ``meta.json``) cannot send a write elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
import unicodedata

from mutualkd.errors import UserError

__all__ = ["MAX_NAME_BYTES", "MAX_NAME_CHARS", "name_problem", "check_name", "look_alikes", "name_key", "inside"]

#: A name's bounds: characters (readable in logs and tables) and UTF-8 bytes (the file-system limit).
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 255
#: Unicode categories a name may not hold: control, format (zero-width, bidi), unassigned, surrogates,
#: private use, and separators other than the plain space's (line and paragraph separators).
_REFUSED = {"Cc": "a control character", "Cf": "an invisible format character (e.g. zero-width or bidi)",
            "Cn": "an unassigned code point", "Cs": "a lone surrogate", "Co": "a private-use character",
            "Zl": "a line separator", "Zp": "a paragraph separator"}


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be one path component (None if it can).

    Spaces (category Zs: the plain space, and the no-break and ideographic ones that look
    like it or like nothing) are refused with the invisible characters: a name is one word
    that a shell, a table and a file system all show the same way.
    """
    if not value:
        return "is empty"
    if "\x00" in value:
        return "holds a NUL character"
    if "/" in value or "\\" in value:
        return "holds a path separator"
    if value in (".", ".."):
        return f"is {value!r}, which is not a folder of its own"
    if (n := len(value.encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
        return f"is {n} bytes long, more than a folder name may be ({MAX_NAME_BYTES})"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long, more than {MAX_NAME_CHARS}"
    for i, c in enumerate(value):
        cat = unicodedata.category(c)
        if cat in _REFUSED or cat == "Zs":
            what = _REFUSED.get(cat, "a space")
            return f"holds {what} (U+{ord(c):04X}) at position {i}"
    return None


def check_name(value: str, field: str, *, example: str) -> str:
    """``value``, or a ValueError (a pydantic validator's) saying why ``field`` cannot hold it and what to write."""
    problem = name_problem(value)
    if problem:
        raise ValueError(f"{field} {problem}; use a plain name such as \"{example}\" (one folder name: no / or \\,"
                         f" not . or .., no spaces or invisible characters, at most {MAX_NAME_CHARS} characters)")
    return value


def name_key(name: str) -> str:
    """What two names that look alike share: NFKC-normalised and case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def look_alikes(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of different names that look alike (:func:`name_key`), in order of appearance."""
    seen: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for n in names:
        key = name_key(n)
        if key in seen and seen[key] != n:
            pairs.append((seen[key], n))
        seen.setdefault(key, n)
    return pairs


def inside(root: Path, path: Path, *, what: str, hint: str) -> Path:
    """``path`` if it resolves to ``root`` or a path under it; a UserError naming both otherwise.

    Symbolic links are followed (a link inside ``root`` that points out of it is refused too).
    """
    base = Path(root).resolve()
    target = Path(path).resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{what} {path} resolves to {target}, outside {base}", where=str(path), hint=hint)
    return path

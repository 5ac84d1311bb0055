"""pydantic's validation errors as one RecipeError naming the TOML path of each field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mutualkd.errors import RecipeError

__all__ = ["format_validation_error"]


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError, file: str, prefix: str = "") -> RecipeError:
    """Turn pydantic's error list into one RecipeError naming the TOML path of each field."""
    lines = []
    first_field = None
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = _loc_to_path(loc)
        if prefix:
            field = f"{prefix}.{field}" if field else prefix
        first_field = first_field or field
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            msg = f"got {e.get('input')!r}, expected one of {expected}"
        elif "input" in e and e["type"] not in ("model_type",) and not isinstance(e["input"], (dict, list)):
            try:
                shown = repr(e["input"])
            except ValueError:  # an int of more digits than Python converts to text
                shown = "a number of over 4300 digits"
            msg = f"{msg} (got {shown[:200]})"
        lines.append(f"[{field}] {msg}")
    head = lines[0].split("] ", 1)[1] if len(lines) == 1 else f"{len(lines)} fields are invalid:\n  " + "\n  ".join(lines)
    return RecipeError(
        head,
        file=file,
        field=first_field if len(lines) == 1 else None,
        hint="edit the recipe (or the override: --set, overrides=) so each field above has a value of the expected kind",
    )

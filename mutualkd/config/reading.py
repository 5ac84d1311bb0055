"""Reading a recipe file: bounded in size and nesting, every failure a RecipeError (YAML and JSON told apart)."""

from __future__ import annotations

import json
from pathlib import Path
import re
import tomllib
from typing import Any

from mutualkd.config._fields import MAX_NESTING, MAX_RECIPE_BYTES
from mutualkd.errors import RecipeError

__all__ = ["read_toml", "check_nesting"]


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning every way it can fail into a RecipeError."""
    p = Path(path)
    if not p.exists():
        raise RecipeError("recipe file not found", file=str(p), hint="check the path; recipes/ holds the shipped recipes")
    if p.is_dir():
        raise RecipeError("this is a folder, not a recipe file", file=str(p), hint="name a .toml file")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # bounded: /dev/zero or a huge file must not fill the memory
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror or e}", file=str(p), hint="check the path") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short TOML file",
            file=str(p), hint="name the recipe's .toml file (recipes/ holds the shipped ones)",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
            file=str(p),
            hint="save the recipe as UTF-8 text",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        other = _other_format(text, str(e))
        if other:
            raise RecipeError(f"TOML syntax error: {e}; {other[0]}", file=str(p), hint=other[1]) from None
        raise RecipeError(f"TOML syntax error: {e}", file=str(p), hint="fix the TOML syntax at the line and column named") from None
    except RecursionError:
        raise RecipeError(f"arrays or tables nested more than {MAX_NESTING} deep", file=str(p),
                          hint="a recipe's values are flat; remove the nesting") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise RecipeError(f"a value that cannot be read: {str(e).split(';')[0]}", file=str(p),
                          hint="write the number with fewer digits") from None
    check_nesting(data, str(p))
    return data


_YAML_KEY = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*:(\s|$)")
_YAML_ITEM = re.compile(r"^\s*-\s+\S")
_TOML_HOW = "mutualkd recipes are TOML (recipes/quickstart.toml is one): `key = value` lines, strings quoted,"\
    " `[table]` headers, `[a, b]` lists, `[[peers]]` for each peer"


def _other_format(text: str, error: str) -> tuple[str, str] | None:
    """``(what, hint)`` when text that TOML refused is YAML or JSON (a recipe saved in the wrong
    format keeps its ``.toml`` name), else None. YAML is told by the line TOML stopped at, a
    ``key: value`` mapping or a ``- item`` list entry, or by a ``---`` document start."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return "this looks like JSON", f"{_TOML_HOW}; e.g. {{\"run\": {{\"epochs\": 15}}}} is `[run]` then `epochs = 15`"
    lines = text.splitlines()
    at = re.search(r"at line (\d+)", error)
    n = int(at.group(1)) if at else 0
    yaml_like = [i for i, line in enumerate(lines, 1) if _YAML_KEY.match(line) or _YAML_ITEM.match(line)]
    if n not in yaml_like:
        if not (stripped.startswith("---") and yaml_like):
            return None
        n = yaml_like[0]
    line = lines[n - 1]
    key = _YAML_KEY.match(line)
    if key and line.rstrip().endswith(":"):  # a YAML mapping that opens a table
        example = f"write this line as the table header `[{key.group(1)}]` and its keys below it as `name = value`"
    elif key:
        value = line.split(":", 1)[1].strip()
        try:
            tomllib.loads(f"v = {value}")
        except (tomllib.TOMLDecodeError, ValueError):
            value = json.dumps(value.strip("'\""))  # a bare YAML string
        example = f"write this line as `{key.group(1)} = {value}`"
    else:
        example = "write a list as `name = [a, b]`, a list of tables as one `[[name]]` header per entry"
    return f"this looks like YAML (line {n}: {line.strip()[:80]!r})", f"{_TOML_HOW}; {example}"


def check_nesting(data: Any, file: str, what: str = "") -> None:
    """A RecipeError naming the deepest field when tables or arrays nest more than :data:`MAX_NESTING` deep."""
    todo: list[tuple[Any, str, int]] = [(data, "", 0)]
    while todo:
        node, where, depth = todo.pop()
        if depth > MAX_NESTING:
            raise RecipeError(
                f"{what}tables or arrays nested more than {MAX_NESTING} deep", file=file, field=where[:200] or None,
                hint="a recipe's values are flat; remove the nesting",
            )
        if isinstance(node, dict):
            todo.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))

"""``--set`` overrides (and the Python API's ``overrides=``) applied to a raw recipe dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import copy
import tomllib
from typing import Any

from mutualkd.config._fields import MAX_NESTING
from mutualkd.errors import RecipeError

__all__ = ["apply_overrides"]


def _coerce_value(text: str) -> Any:
    """Read a --set value as TOML (numbers, booleans, strings, lists); bare words are strings."""
    if text.lower().lstrip("+-") in ("nan", "inf"):
        return text  # a bare word here is meant as a name, not a float
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError):  # ValueError: an integer of over 4300 digits
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any],
                    file: str = "<recipe>") -> dict[str, Any]:
    """Apply overrides to a raw recipe dict; returns a new dict.

    ``overrides`` is either the command line's ``--set`` items, ``"a.b.c=value"`` with the
    value read as TOML (:func:`_coerce_value`), or a mapping of the same dotted keys to
    Python values, taken as they are (``{"run.epochs": 2, "peers.0.model": "cifar_resnet32"}``).
    A number in a key indexes a list (``peers.0``).
    """
    data = copy.deepcopy(data)
    if isinstance(overrides, Mapping):
        for path, value in overrides.items():
            _set_path(data, str(path), copy.deepcopy(value), f"overrides[{str(path)!r}]", file)
        return data
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set {item!r} is not of the form key=value",
                file=file,
                hint="write e.g. --set run.epochs=5 or --set peers.0.model=cifar_resnet32",
            )
        path, _, raw = item.partition("=")
        _check_path(path.strip(), f"--set {item!r}", file)
        try:
            value = _coerce_value(raw.strip())
        except RecursionError:
            raise RecipeError(f"--set {path}: the value nests arrays or tables more than {MAX_NESTING} deep",
                              file=file, field=path[:200], hint="a recipe's values are flat; remove the nesting") from None
        _set_path(data, path.strip(), value, f"--set {item!r}", file)
    return data


def _check_path(path: str, what: str, file: str) -> list[str]:
    """The keys of a dotted override key; a RecipeError for an empty key or one nested too deep."""
    keys = path.split(".")
    example = "--set run.epochs=5" if what.startswith("--set") else "overrides={'run.epochs': 5}"
    if not all(keys):
        raise RecipeError(f"{what} has an empty key", file=file, hint=f"write e.g. {example}")
    if len(keys) > MAX_NESTING:
        raise RecipeError(f"{what}: more than {MAX_NESTING} keys deep", file=file, field=path[:200],
                          hint=f"write e.g. {example}")
    return keys


def _set_path(data: dict[str, Any], path: str, value: Any, what: str, file: str) -> None:
    """Set the dotted key ``path`` of ``data`` to ``value``, creating tables on the way.

    ``what`` names the override in errors (``--set 'run.x=1'`` or ``overrides['run.x']``).
    """
    keys = _check_path(path, what, file)
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(keys[: depth + 1]), file)
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(
                    f"{what}: {'.'.join(keys[: depth + 1])} is a value, not a table",
                    file=file,
                    field=".".join(keys[: depth + 1]),
                )
    if isinstance(node, list):
        node[_index(keys[-1], path, file, len(node))] = value
    else:
        node[keys[-1]] = value


def _index(key: str, path: str, file: str, length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise RecipeError(
            f"'{key}' is not an index of a list of length {length}",
            file=file,
            field=path,
            hint=f"use an index from 0 to {length - 1}, e.g. peers.0.model=...",
        )
    return int(key)


def _list_item(node: list[Any], key: str, path: str, file: str) -> Any:
    return node[_index(key, path, file, len(node))]

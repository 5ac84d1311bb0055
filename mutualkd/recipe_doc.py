"""The recipe reference, written from the pydantic models that validate recipes.

One source of truth: every section and key of a recipe is a field of
:class:`mutualkd.config.Recipe` (its type, default and ``Field(description=...)``), and
every strategy's keys are the fields of its plugin's ``Params`` model, found through the
registry's entry points. Two views are drawn from them:

* :func:`render_reference`, the Markdown page ``docs/recipes.md``; regenerate it with
  ``python -m mutualkd.recipe_doc docs/recipes.md`` (``make reference``), and check it
  with ``--check``, which fails when the page is out of date;
* :func:`explain`, one row per key of a resolved recipe, its value, whether the recipe
  set it or the default applies, and the description (``mutualkd validate RECIPE --explain``).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
import inspect
import json
from pathlib import Path
import re
import sys
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mutualkd.config import Recipe

if TYPE_CHECKING:
    from mutualkd.registry import PluginInfo

__all__ = [
    "ExplainRow",
    "KeyDoc",
    "default_text",
    "explain",
    "key_docs",
    "main",
    "render_reference",
    "toml_value",
    "type_text",
]

_TOML_TYPES: dict[Any, str] = {int: "integer", float: "float", str: "string", bool: "boolean", Any: "any"}
REGENERATE = "python -m mutualkd.recipe_doc docs/recipes.md"


@dataclass(frozen=True)
class KeyDoc:
    """One key of a section, as the reference lists it."""

    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class ExplainRow:
    """One key of a resolved recipe: ``source`` is ``recipe`` (set there or by --set) or ``default``."""

    key: str
    value: str
    source: Literal["recipe", "default"]
    description: str


# --------------------------------------------------------------------------- values and types


def toml_value(value: Any) -> str:
    """``value`` written as TOML (a model as an inline table; None, which TOML lacks, as ``unset``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


#: annotated-types constraints (pydantic's Gt, Ge, ...), read by their attribute.
_COMPARISONS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_LENGTHS = (("min_length", ">="), ("max_length", "<="))


def _bounds(metadata: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            out += _bounds(m.metadata)
            continue
        out += [f"{op} {getattr(m, attr)}" for attr, op in _COMPARISONS if getattr(m, attr, None) is not None]
        out += [f"length {op} {getattr(m, attr)}" for attr, op in _LENGTHS if getattr(m, attr, None) is not None]
    return out


def type_text(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """A TOML reader's name for the type ``tp`` with its bounds, e.g. ``integer > 0``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return type_text(args[0], [*tp.__metadata__, *metadata])
    if origin in (Union, types.UnionType):  # None is "unset": the default column says so
        text = " or ".join(type_text(a) for a in args if a is not type(None))
    elif origin is Literal:
        text = "one of " + ", ".join(toml_value(a) for a in args)
    elif origin is list:
        item = type_text(args[0])
        text = f"array, each {item}" if item.startswith("one of") else f"array of {item}"
    elif origin is tuple:
        text = "array [" + ", ".join(type_text(a) for a in args) + "]"
    elif origin is dict:
        text = "table"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = f"table (the keys of {_SECTIONS[tp]})" if tp in _SECTIONS else "table"
    else:
        text = _TOML_TYPES.get(tp, getattr(tp, "__name__", str(tp)))
    bounds = _bounds(metadata)
    compare = [b for b in bounds if not b.startswith("length")]  # integer > 0
    length = [b for b in bounds if b.startswith("length")]  # string (length >= 1)
    if compare:
        text += " " + ", ".join(compare)
    if length:
        text += f" ({', '.join(length)})"
    return text


def _model_of(tp: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a table field holds (``X``, ``X | None``, ``list[X]``), and whether it is an array of tables."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        models = [m for m, _ in map(_model_of, args) if m is not None]
        return (models[0] if len(models) == 1 else None), False
    if origin is list and args:
        return _model_of(args[0])[0], True
    return (tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None), False


#: Models that are a recipe section of their own, e.g. OptimizerConfig -> "[optimizer]":
#: where else they appear (a peer's optimizer, ie_kd's ae_optimizer), they are named by it.
_SECTIONS: dict[type[BaseModel], str] = {
    model: f"[{name}]"
    for name, info in Recipe.model_fields.items()
    for model, many in [_model_of(info.annotation)]
    if model is not None and not many
}


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def default_text(info: FieldInfo) -> str:
    """The default as TOML, or ``required``."""
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    return toml_value(_default(info))


def key_docs(model: type[BaseModel]) -> list[KeyDoc]:
    """The keys of ``model``'s table, in declaration order."""
    return [
        KeyDoc(name, type_text(info.annotation, info.metadata), default_text(info), info.description or "")
        for name, info in model.model_fields.items()
    ]


# --------------------------------------------------------------------------- the reference page


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _key_table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for d in key_docs(model):
        default = d.default if d.default in ("required", "unset") else f"`{_cell(d.default)}`"
        lines.append(f"| `{d.key}` | {_cell(d.type)} | {default} | {_cell(d.description)} |")
    return lines


def _markdown(doc: str | None) -> str:
    """A docstring as Markdown: rST ``code`` becomes `code`."""
    return re.sub(r"``(.+?)``", r"`\1`", inspect.cleandoc(doc or "")).strip()


def _strategies(distributions: Collection[str] | None) -> list[PluginInfo]:
    """The loadable strategy plugins (entry points only), built-ins first, then by name."""
    from mutualkd import registry

    infos = [
        i
        for i in registry.infos(load=True)
        if i.kind == "strategy" and i.status == "ok" and i.distribution != "<in-process>"
        and (distributions is None or i.distribution in distributions)
    ]
    return sorted(infos, key=lambda i: (i.distribution != "mutualkd", i.name))


def _peers_text(cls: Any) -> str:
    lo, hi = cls.min_peers, cls.max_peers
    if hi is None:
        return f"at least {lo}"
    return f"exactly {lo}" if lo == hi else f"{lo} to {hi}"


def _strategy_section(info: PluginInfo) -> list[str]:
    cls = info.obj
    summary = _markdown(cls.__doc__).split("\n\n")[0].replace("\n", " ")
    lines = [
        f"### `{info.name}`",
        "",
        summary,
        "",
        f"Provided by the distribution `{info.distribution}` (`{info.value}`). Peers: {_peers_text(cls)}."
        f" `[schedule] mode`: {', '.join(f'`{m}`' for m in cls.modes)}.",
        "",
    ]
    if cls.Params.model_fields:
        lines += _key_table(cls.Params)
    else:
        lines.append("No parameters.")
    return [*lines, ""]


def render_reference(distributions: Collection[str] | None = None) -> str:
    """The Markdown recipe reference: sections, keys, and the strategies' parameters.

    ``distributions`` limits the strategies to those of the named distributions; None
    documents every strategy plugin installed.
    """
    lines = [
        "# Recipe reference",
        "",
        f"<!-- Generated from the pydantic models by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "A recipe is a TOML file with the sections below; each key has a type, a default (or is required)"
        " and a purpose. Unknown keys are refused everywhere, with the close matches named.",
        "",
        "`mutualkd validate RECIPE --explain` prints a recipe with every key resolved: its value, whether the"
        " recipe sets it or the default applies, and what it does. Override any key on the command line with"
        " `--set section.key=value` (`--set peers.0.model=cifar_resnet32` for a peer).",
        "",
        "## Sections",
        "",
    ]
    for name, info in Recipe.model_fields.items():
        model, many = _model_of(info.annotation)
        assert model is not None, f"Recipe.{name} is not a table"
        header = f"[[{name}]]" if many else f"[{name}]"
        required = " Required." if info.is_required() else " Optional." if info.default is None else ""
        purpose = _markdown(info.description)
        lines += [f"### `{header}`", "", f"{purpose[:1].upper()}{purpose[1:]}.{required}", ""]
        lines += _key_table(model)
        if name == "peers":
            own = [k for k, f in model.model_fields.items() if _model_of(f.annotation)[0] in _SECTIONS]
            lines += [
                "",
                "A peer's own " + ", ".join(f"`[peers.{k}]`" for k in own) + " tables (written after its"
                " `[[peers]]` table) take the keys of " + ", ".join(f"`[{k}]`" for k in own) + ".",
            ]
        if name == "strategy":
            lines += ["", "Every other key is a parameter of the named strategy: see [Strategies](#strategies)."]
        lines.append("")
    lines += [
        "## Strategies",
        "",
        "Each strategy plugin validates its `[strategy]` keys with its own `Params` model; unknown keys are"
        " refused. `mutualkd plugins` lists the strategies installed.",
        "",
    ]
    for info in _strategies(distributions):
        lines += _strategy_section(info)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- explain


def _rows(prefix: str, model: BaseModel, *, given: bool = True) -> Iterator[ExplainRow]:
    """A row per field of ``model``, nested tables flattened; ``given=False``: all defaults."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}.{name}"
        set_here = given and name in model.model_fields_set
        if isinstance(value, BaseModel):
            # A default table (e.g. ie_kd's ae_optimizer) was built with keyword arguments:
            # its own fields_set would claim them all, so the parent decides.
            yield from _rows(key, value, given=set_here)
        else:
            yield ExplainRow(key, toml_value(value), "recipe" if set_here else "default", info.description or "")


def explain(recipe: Recipe, strategy_params: BaseModel | None = None) -> list[ExplainRow]:
    """Every key of ``recipe``, resolved: sections in order, each peer, then the strategy's parameters.

    ``strategy_params`` is the strategy's validated ``Params`` object (its defaults
    filled in); unset, the one the recipe's load resolved (``recipe.strategy.resolved``),
    and for a recipe never resolved the ``[strategy]`` keys as the recipe gives them.
    A peer without a table of its own (optimizer, schedule, ...) shows the shared one it uses.
    """
    if strategy_params is None and recipe.strategy.resolved is not None:
        strategy_params = recipe.strategy.resolved[1]
    rows: list[ExplainRow] = []
    names = recipe.peer_names()
    for section, section_info in Recipe.model_fields.items():
        value = getattr(recipe, section)
        if value is None:  # an optional section the recipe leaves out
            rows.append(ExplainRow(section, "unset", "default", section_info.description or ""))
        elif section == "peers":
            for i, peer in enumerate(value):
                for row in _rows(f"peers[{i}]", peer):
                    field = row.key.rsplit(".", 1)[1]
                    if field == "name" and peer.name is None:
                        row = ExplainRow(row.key, toml_value(names[i]), "default", row.description)
                    elif row.value == "unset" and f"[{field}]" in _SECTIONS.values() and getattr(recipe, field):
                        row = ExplainRow(row.key, f"the shared [{field}]", "default", row.description)
                    rows.append(row)
        elif section == "strategy":
            rows.extend(_rows("strategy", value))
            if strategy_params is not None:
                rows.extend(_rows("strategy", strategy_params))
            else:
                rows.extend(ExplainRow(f"strategy.{k}", toml_value(v), "recipe", "") for k, v in value.params.items())
        else:
            rows.extend(_rows(section, value))
    return rows


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mutualkd.recipe_doc OUT [--check]``: write the reference, or check it is current."""
    parser = argparse.ArgumentParser(prog="python -m mutualkd.recipe_doc", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the Markdown file, e.g. docs/recipes.md")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when OUT is out of date")
    parser.add_argument(
        "--distribution", action="append", metavar="NAME",
        help="document only the strategies of this distribution (repeatable); default: every one installed",
    )
    args = parser.parse_args(argv)
    text = render_reference(args.distribution)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            sys.stderr.write(f"{args.out} is out of date; regenerate it with `{REGENERATE}`\n")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

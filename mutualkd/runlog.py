"""What a run writes: ``metrics.jsonl``, ``summary.json``, the resolved recipe, the console.

Only the main process writes files or prints; the other processes get no-op writers.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["MetricsWriter", "console", "dump_toml", "summary_table"]

console = Console(stderr=False, highlight=False)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl``; resumable by truncating to a byte offset."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh = None
        if path is not None:
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
        self._fh.flush()

    def offset(self) -> int:
        """Bytes written so far (saved with each checkpoint)."""
        if self._fh is None:
            return 0
        self._fh.flush()
        return self._fh.tell()

    def truncate(self, offset: int) -> None:
        """Drop what was logged after a checkpoint, so a resumed run repeats no line."""
        if self._fh is None or self.path is None:
            return
        self._fh.close()
        with open(self.path, "r+b") as f:
            f.truncate(offset)
        self._fh = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a recipe dict (tables, arrays of tables, scalars) as TOML."""
    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any], array: bool = False) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping) and not _is_table_list(v)}
        lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
        for k, v in d.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}", v)
            elif _is_table_list(v):
                for item in v:
                    table(f"{prefix}.{k}", item, array=True)

    for k, v in data.items():
        if isinstance(v, Mapping):
            table(k, v)
        elif _is_table_list(v):
            for item in v:
                table(k, item, array=True)
        else:
            lines.insert(0, f"{k} = {_toml_value(v)}")
    return "\n".join(lines)


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def summary_table(summary: Mapping[str, Any]) -> Table:
    t = Table(title=f"run {summary.get('name', '')}: test top-1 (%)")
    t.add_column("model")
    t.add_column("final", justify="right")
    t.add_column("best", justify="right")
    t.add_column("best epoch", justify="right")
    for name, row in summary.get("top1", {}).items():
        t.add_row(name, f"{row['final']:.2f}", f"{row['best']:.2f}", str(row["best_epoch"]))
    return t


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

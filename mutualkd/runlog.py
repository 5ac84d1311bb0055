"""What a run writes: ``metrics.jsonl``, ``summary.json``, the resolved recipe, the console.

Only the main process writes files or prints; the other processes get no-op writers.
``metrics.jsonl`` is flushed after every record and fsynced with every checkpoint; each
checkpoint holds a copy of the file up to that point, so that a resume can put back a
file that was deleted, cut short or changed.
"""

from __future__ import annotations

from collections.abc import Mapping
import errno
import io
import json
import math
import os
from pathlib import Path
from typing import Any
import zlib

from rich.console import Console
from rich.table import Table
import tomli_w

from mutualkd.errors import UserError

__all__ = ["MetricsWriter", "console", "dump_toml", "summary_table", "plain_text", "atomic_write_text", "write_failed"]

console = Console(stderr=False, highlight=False)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_failed(path: Path, e: OSError) -> UserError:
    """A file of the run could not be written (a full disk, a read-only file system, a folder in its place)."""
    from mutualkd.errors import os_reason

    then = "then continue with `mutualkd run --resume RUN_DIR`"
    if e.errno in (errno.EISDIR, errno.ENOTDIR):
        hint = f"{path.name} must be a file: move what is at {path} away, {then}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make the run folder writable again (its permissions, or a file system mounted read-only), {then}"
    else:
        hint = f"free space on that disk (or move the run folder to a disk with room), {then}"
    return UserError(f"cannot write {path.name}: {os_reason(e)}; the checkpoints written so far are kept",
                     where=str(path), hint=hint)


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl``; a resume cuts it back to a checkpoint's byte offset."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh: Any = None
        self._failed = False  # a write failed (and said so): closing must not raise over that error
        if path is not None:
            self._fh = self._open()

    def _open(self) -> Any:
        assert self.path is not None
        try:
            return open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_failed(self.path, e) from None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
            self._fh.flush()
        except OSError as e:
            self._failed = True
            raise write_failed(self.path, e) from None  # type: ignore[arg-type]

    def offset(self) -> int:
        """Bytes written so far (saved with each checkpoint)."""
        if self._fh is None:
            return 0
        self._fh.flush()
        return self._fh.tell()

    def sync(self) -> None:
        """Flush and fsync, so that what a checkpoint points at is on disk before the checkpoint."""
        if self._fh is None:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            self._failed = True
            raise write_failed(self.path, e) from None  # type: ignore[arg-type]

    def snapshot(self) -> bytes:
        """The file so far, compressed (a checkpoint's own copy of it); empty off the main process."""
        if self._fh is None or self.path is None:
            return b""
        n = self.offset()
        try:
            with open(self.path, "rb") as f:
                return zlib.compress(f.read(n), 6)
        except OSError:
            return b""  # no copy: a resume can then only cut the file back

    def truncate(self, offset: int) -> None:
        """Drop what was logged after a checkpoint, so a resumed run repeats no line (never extends the file)."""
        if self._fh is None or self.path is None:
            return
        self._fh.close()
        with open(self.path, "r+b") as f:
            if f.seek(0, os.SEEK_END) > offset:
                f.truncate(offset)
        self._fh = self._open()

    def resume(self, offset: int, snapshot: bytes | None, checkpoint: str) -> str | None:
        """Bring the file back to what it was at the checkpoint; a note for the console if it had to be repaired.

        The normal case cuts off what was logged after the checkpoint. A file that is
        missing, shorter than the checkpoint's offset, or different before it is rewritten
        from the checkpoint's copy (a different file is kept as ``metrics.jsonl.replaced``).
        A checkpoint without a copy (an earlier mutualkd) can only cut the file.
        """
        if self._fh is None or self.path is None:
            return None
        self._fh.flush()
        current = self.path.read_bytes() if self.path.exists() else b""
        saved = zlib.decompress(snapshot) if snapshot else None
        if saved is None or len(saved) != offset:
            if len(current) < offset:
                self.truncate(len(current))
                return (f"metrics.jsonl holds {len(current)} bytes, the checkpoint {checkpoint} points at {offset};"
                        " it has no copy to restore it from, so the records before it are incomplete")
            self.truncate(offset)
            return None
        if current[:offset] == saved:
            self.truncate(offset)
            return None
        self._fh.close()
        if len(current) >= offset:
            os.replace(self.path, self.path.with_name(self.path.name + ".replaced"))
            what = "differed from the one the checkpoint recorded (kept as metrics.jsonl.replaced)"
        else:
            what = "was missing" if not current else f"was cut short ({len(current)} of {offset} bytes)"
        atomic_write_bytes(self.path, saved)
        self._fh = self._open()
        lines = saved.count(b"\n")
        return f"metrics.jsonl {what}; its first {lines} records were restored from checkpoint {checkpoint}"

    def close(self) -> None:
        """Close the file. After a failed write, closing retries the same bytes and fails the same way:
        that second failure is dropped, so the error the run stops with is the first one."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.close()
        except OSError as e:
            if not self._failed:
                raise write_failed(self.path, e) from None  # type: ignore[arg-type]


def dump_toml(data: Mapping[str, Any]) -> str:
    """A recipe dict (tables, arrays of tables, scalars) as TOML, written by tomli-w."""
    return tomli_w.dumps(dict(data))


def summary_table(summary: Mapping[str, Any]) -> Table:
    t = Table(title=f"run {summary.get('name', '')}: test top-1 (%)")
    t.add_column("model")
    t.add_column("final", justify="right")
    t.add_column("best", justify="right")
    t.add_column("best epoch", justify="right")
    at_best = summary.get("top1_at_best_epoch") or {}
    best_epoch = summary.get("best_epoch")
    if best_epoch:
        t.add_column(f"at epoch {best_epoch}", justify="right")
    for name, row in summary.get("top1", {}).items():
        cells = [name, f"{row['final']:.2f}", f"{row['best']:.2f}", str(row["best_epoch"])]
        if best_epoch:
            cells.append(f"{at_best[name]:.2f}" if name in at_best else "-")
        t.add_row(*cells)
    notes = []
    if best_epoch:
        notes.append(f"best/ holds epoch {best_epoch}, chosen on the {summary.get('best_chosen_by', 'test')} split")
    if summary.get("stages"):  # epochs are counted over all stages, as in metrics.jsonl and the report
        notes.append("epochs " + ", ".join(f"{s['first_epoch']}-{s['last_epoch']}: {s['name']}" for s in summary["stages"]))
    if notes:
        t.caption = "; ".join(notes)
    return t


def plain_text(renderable: Any, width: int = 100) -> str:
    """A rich renderable (a table) as plain text, for log handlers that are not the console."""
    out = Console(width=width, record=True, color_system=None, file=io.StringIO())
    out.print(renderable)
    return out.export_text().rstrip()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file, fsynced, renamed into place (a UserError if that fails)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise write_failed(path, e) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

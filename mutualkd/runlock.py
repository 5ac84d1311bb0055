"""One writer per run folder: an exclusive ``flock`` on the folder, held for the whole run.

The main process takes the lock before it writes anything into the folder and keeps it
until the run ends; the kernel drops it when the process dies, however it dies, so a
stale lock cannot block a folder. A second ``mutualkd run`` on a folder that is being
written (a resume started while the run still trains, or a scheduler's requeue while the
workers of a killed launcher still train) is refused at once with exit code 2.

The lock is taken on the folder itself (no lock file is written). On a file system
without ``flock`` (some network file systems) the run goes on unlocked, with a warning.
This module imports nothing heavy: the command line looks at the lock before it loads torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from mutualkd.errors import UserError

__all__ = ["RunLock", "RunFolderBusy", "ensure_not_busy", "run_folder_of"]


class RunFolderBusy(UserError):
    """Another process holds the lock of the run folder."""


def _holder(path: Path) -> int | None:
    """The process holding a flock on ``path``, from /proc/locks (Linux), when it can be told."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF" (a "->" marks a waiting request)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError):
            major, minor, inode = parts[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return int(parts[4])
    return None


def _busy(path: Path) -> RunFolderBusy:
    pid = _holder(path)
    who = f"process {pid}" if pid is not None and pid != os.getpid() else "another process"
    return RunFolderBusy(
        f"the run folder is being written by {who} (it holds the folder's lock): a run that is still"
        " training, or the workers of a launcher that was killed",
        where=str(path),
        hint="wait for that run to end, or stop it (its workers too), then resume; two processes must never"
        " write one run folder",
    )


class RunLock:
    """The exclusive lock on a run folder; :meth:`acquire` raises :class:`RunFolderBusy` if another holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        #: Why the folder could not be locked (a file system without flock), for a warning; None when locked.
        self.unsupported: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _busy(self.path) from None
            self.unsupported = f"{e.strerror or e}"
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def run_folder_of(path: str | Path) -> Path:
    """The run folder a ``--resume`` path names: itself, or the run holding one of its checkpoint folders."""
    p = Path(path)
    if not p.is_dir():
        raise UserError("run folder to resume does not exist", where=str(p), hint="name the folder of an earlier run")
    return p.parent.parent if p.parent.name == "checkpoints" else p


def ensure_not_busy(path: Path) -> None:
    """Raise :class:`RunFolderBusy` at once if ``path`` is a run folder another process holds locked."""
    path = Path(path)
    if not path.is_dir():
        return
    probe = RunLock(path)
    try:
        probe.acquire()
    except OSError:
        return
    finally:
        probe.release()

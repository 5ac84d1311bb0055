"""Stop requests: SIGINT / SIGTERM ask the fit loop to stop after the current batch.

The first signal sets a flag that the loop reads after each batch (it then writes a
checkpoint and raises :class:`RunInterrupted`); a second signal stops at once.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from pathlib import Path
import signal
from typing import Any

__all__ = ["RunInterrupted", "StopRequest"]


class RunInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the current batch finished and a checkpoint was written."""

    def __init__(self, signum: int, run_dir: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.run_dir = run_dir
        self.exit_code = 128 + signum


class StopRequest:
    """The signal that asked the run to stop, if any (``signum``), while :meth:`installed` is active."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        old: dict[int, Any] = {}
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

"""The library's messages: the ``mutualkd`` logger and the console handler that prints them by default.

Every informational line of a run (where the weights came from, the data pipeline, notes,
strategy warnings, one line per epoch, the summary table) is a record of a logger under
``logging.getLogger("mutualkd")``. What the user sees depends on logging alone:

- nothing configured: :class:`ConsoleHandler`, on the ``mutualkd`` logger, prints them
  with rich as ``mutualkd run`` shows them (``note:`` and ``warning:`` in yellow, epoch
  lines in bold, the summary as a table);
- a handler of the user's own on a ``mutualkd`` logger or on the root logger
  (``logging.basicConfig(...)``): the records go there, and the console handler stays
  silent, like Python's own last-resort handler;
- ``logging.getLogger("mutualkd").setLevel(logging.WARNING)``: the informational lines
  (and the progress bar) are gone, warnings remain.

The ``mutualkd`` logger is set to INFO when it is first used, unless its level was set
before; it still propagates to the root logger. The command line attaches a console
handler of its own for each command (:func:`attach_console`), so that its output does not
depend on what else configured logging in the process.
"""

from __future__ import annotations

from collections.abc import Callable
import logging

__all__ = ["ROOT", "ConsoleHandler", "attach_console", "get_logger", "shows_info"]

#: The name of the library's top logger; every module logs under it (``mutualkd.engine.hooks``).
ROOT = "mutualkd"


class ConsoleHandler(logging.Handler):
    """Prints mutualkd's records through the rich console, unless another handler receives them.

    A record may carry two extras: ``head``, a leading part of the message shown in bold,
    and ``renderable``, a rich object (a table) printed in place of the plain message.
    ``always=True`` prints every record even when other handlers receive it too (the
    command line's own handler).
    """

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def emit(self, record: logging.LogRecord) -> None:
        if not self.always and _another_handler(record, self):
            return
        try:
            from rich.text import Text

            from mutualkd.runlog import console

            renderable = getattr(record, "renderable", None)
            if renderable is not None:
                console.print(renderable)
                return
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                console.print(Text("warning: ", style="yellow") + Text(message), soft_wrap=True, highlight=False)
                return
            text = Text(message)
            head = getattr(record, "head", None)
            if head and message.startswith(head):
                text.stylize("bold", 0, len(head))
            elif message.startswith("note:"):
                text.stylize("yellow", 0, len("note:"))
            console.print(text, highlight=False)
        except Exception:  # a handler never raises into the code that logged (logging's own rule)
            self.handleError(record)


def _another_handler(record: logging.LogRecord, me: logging.Handler) -> bool:
    """Whether a handler other than ``me`` receives ``record`` (on its logger, its parents, the root)."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not me for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return False


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.addHandler(ConsoleHandler())
        if root.level == logging.NOTSET:  # a level the user set first is kept
            root.setLevel(logging.INFO)
    return root


def attach_console() -> Callable[[], None]:
    """Print every mutualkd record on the console until the returned function is called (the CLI's handler)."""
    root = _install()
    handler = ConsoleHandler(always=True)
    root.addHandler(handler)
    return lambda: root.removeHandler(handler)


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``mutualkd...``), with the console handler in place."""
    _install()
    return logging.getLogger(name)


def shows_info() -> bool:
    """Whether informational lines are shown (the progress bar follows them)."""
    return _install().isEnabledFor(logging.INFO)

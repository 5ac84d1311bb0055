"""The CPU threads of a run: how many torch uses inside one operation, and who chose that number.

torch starts with one intra-op thread per core. On a machine that other jobs share, those
threads wait on each other for cores they do not get, and a run slows down many times over
(docs/reliability.md has the measurements). So a run uses, per process: ``run.threads`` when
the recipe sets it, else ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) when the environment
sets it, else one thread. The same rule holds with a GPU, where the CPU threads only do the
data work and the optimizer bookkeeping. The count changes results: float sums are split
differently across threads, so one seed gives slightly different accuracies with another count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
from dataclasses import dataclass
import os

import torch

__all__ = ["ThreadChoice", "resolve_threads", "threads_applied"]

#: Environment variables that set the thread count when the recipe does not, in this order.
ENV_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: The count when neither the recipe nor the environment sets one.
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of each process and where it came from (``recipe``, an environment
    variable's name, or ``default``)."""

    count: int
    source: str

    def describe(self) -> str:
        return f"{self.count} CPU thread{'s' if self.count > 1 else ''} per process (from {self.source})"


def resolve_threads(recipe_value: int | None, environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """``run.threads`` if set, else the first of :data:`ENV_VARS` holding a whole number >= 1, else one."""
    if recipe_value is not None:
        return ThreadChoice(recipe_value, "recipe")
    env = os.environ if environ is None else environ
    for var in ENV_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) >= 1:  # what OpenMP itself would not accept is left alone
            return ThreadChoice(int(value), var)
    return ThreadChoice(DEFAULT_THREADS, "default")


@contextlib.contextmanager
def threads_applied(choice: ThreadChoice) -> Iterator[ThreadChoice]:
    """torch's intra-op threads set to ``choice.count`` inside the block, the previous count after it.

    The inter-op pool is set to the same count too, but only the first time in a process and
    before any parallel work (torch refuses it later, and it cannot be changed back).
    """
    previous = torch.get_num_threads()
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(choice.count)
    torch.set_num_threads(choice.count)
    try:
        yield choice
    finally:
        torch.set_num_threads(previous)

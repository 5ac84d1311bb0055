"""What ``accelerate launch`` asked of a run, read once at start.

The launcher hands its settings (its command line's, else those of the ``accelerate config``
file it read) to the processes it starts through the environment: ``ACCELERATE_MIXED_PRECISION``,
``ACCELERATE_DYNAMO_*``, ``ACCELERATE_USE_FSDP`` and the like. The engine keeps precision
(:mod:`.precision`) and compilation (:func:`.build.build_run`) its own, so the Accelerator
is made with neither; this module decides them from the recipe and the launcher:

* mixed precision: the recipe's ``run.mixed_precision`` when set, else the launcher's, else
  ``"no"``; :class:`PrecisionChoice` says which of these it came from, for the start line;
* compilation: each network is compiled once when ``run.compile`` or the launcher's
  ``dynamo_backend`` asks (with the launcher's backend, mode and flags when it has them);
* sharded and DeepSpeed training are refused before anything is built or written.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field
import functools
import io
import os
from pathlib import Path
from typing import Any

from mutualkd.errors import RecipeError, UserError

__all__ = ["PrecisionChoice", "CompileChoice", "resolve_precision", "resolve_compile", "refuse_unsupported",
           "single_process_note"]

PRECISIONS = ("no", "bf16", "fp16")
_ENV_PRECISION = "ACCELERATE_MIXED_PRECISION"
#: Backends the engine does not run: the variable ``accelerate launch`` sets, what it means,
#: the launcher option and the config file's ``distributed_type`` that set it.
_UNSUPPORTED = (
    ("ACCELERATE_USE_FSDP", "fully sharded data parallel (FSDP)", "--use_fsdp", "FSDP"),
    ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", "--use_deepspeed", "DEEPSPEED"),
    ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM", "--use_megatron_lm", "MEGATRON_LM"),
)
SUPPORTED = "one process, several CPU processes (gloo) or data parallel over GPUs (DDP)"


def _on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@functools.cache
def _launch_args() -> Any:
    """The parsed command line of the ``accelerate launch`` that started this process, or None.

    The launcher is this process's parent (one process) or grandparent (torchrun's agent runs
    inside it); its options are read with Accelerate's own parser, so they mean what they meant
    to the launcher. Only used to say where a setting came from.
    """
    try:
        import psutil
        from accelerate.commands.launch import launch_command_parser

        for proc in psutil.Process().parents()[:3]:
            cmd = proc.cmdline()
            for i, arg in enumerate(cmd):
                name = Path(arg).name
                if name == "accelerate-launch" or arg == "accelerate.commands.launch":
                    argv = cmd[i + 1:]
                elif name == "accelerate" and cmd[i + 1:i + 2] == ["launch"]:
                    argv = cmd[i + 2:]
                else:
                    continue
                with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text on options it refuses
                    return launch_command_parser().parse_args(argv)
    except (Exception, SystemExit):  # no psutil, a process gone, options this Accelerate does not know
        return None
    return None


def _config_file(args: Any) -> Path | None:
    """The ``accelerate config`` file the launcher read (``--config_file``, else the default one)."""
    from accelerate.commands.config import default_config_file

    if args.config_file is not None:
        return Path(args.config_file)
    # accelerate launch --cpu ignores the default config file
    return Path(default_config_file) if os.path.isfile(default_config_file) and not args.cpu else None


def _config_value(path: Path, key: str) -> Any:
    try:
        from accelerate.commands.config import load_config_from_file

        return getattr(load_config_from_file(str(path)), key, None)
    except Exception:  # unreadable: the launcher would have failed on it first
        return None


# --------------------------------------------------------------------------- mixed precision


@dataclass(frozen=True)
class PrecisionChoice:
    """The mixed precision of a run and where it came from (``source``, for the start line).

    ``note`` is set when the launcher asked for another precision than the recipe's.
    """

    mode: str
    source: str
    note: str | None = None


def _launcher_source() -> str:
    """Where the launcher's ``ACCELERATE_MIXED_PRECISION`` came from."""
    args = _launch_args()
    if args is None:  # set by hand, by another launcher, or by a launcher on another node
        return f"the environment ({_ENV_PRECISION})"
    if args.mixed_precision is not None:
        return "accelerate launch --mixed_precision"
    path = _config_file(args)
    if path is not None and _config_value(path, "mixed_precision") is not None:
        return f"accelerate config {path}"
    return "default"  # the launcher's own default, "no"


def resolve_precision(recipe_value: str | None, *, recipe_file: str, cpu: bool) -> PrecisionChoice:
    """The run's mixed precision: the recipe's when set, else the launcher's, else ``"no"``.

    fp16 needs a GPU (a CPU would silently train in fp32); a precision the engine does not
    run (the launcher's fp8) is refused. Both exit with the setting to change.
    """
    launched = (os.environ.get(_ENV_PRECISION) or "").strip().lower() or None
    source = _launcher_source() if launched is not None else "default"
    if recipe_value is not None:
        note = None
        if launched != recipe_value and source != "default":  # the launcher's own default asks for nothing
            note = (f"the launcher asked for mixed precision '{launched}' ({source}); this run uses"
                    f" the recipe's run.mixed_precision = \"{recipe_value}\" ({recipe_file}). Leave it out of"
                    " the recipe to take the launcher's, or --set run.mixed_precision=... to change it.")
        choice = PrecisionChoice(recipe_value, "recipe", note)
    else:
        choice = PrecisionChoice(launched or "no", source)
    if choice.mode not in PRECISIONS:
        raise UserError(f"mixed precision \"{choice.mode}\" (from {choice.source}) is not one this engine runs"
                        f" ({', '.join(PRECISIONS)})", where=recipe_file,
                        hint='launch with --mixed_precision bf16 (or fp16 on a GPU, or no), or set'
                        ' run.mixed_precision in the recipe')
    if choice.mode == "fp16" and cpu:
        hint = ('use "bf16" (CPU autocast) or "no" on this machine' if choice.source == "recipe" else
                'launch with --mixed_precision bf16 (CPU autocast) or no, or set run.mixed_precision = "bf16"')
        raise RecipeError(f"mixed_precision = \"fp16\" (from {choice.source}) needs a GPU (on a CPU it would"
                          " silently train in fp32)", file=recipe_file, field="run.mixed_precision", hint=hint)
    return choice


# --------------------------------------------------------------------------- compilation


@dataclass(frozen=True)
class CompileChoice:
    """How the networks are compiled: ``torch.compile`` keyword arguments, and who asked."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    regional: bool = False
    source: str = "run.compile"

    def apply(self, module: Any) -> Any:
        """``module`` compiled, or as it is when it already is (compiled once, whoever asked)."""
        from accelerate.utils import compile_regions, is_compiled_module
        import torch

        if is_compiled_module(module):
            return module
        compile_fn: Callable[..., Any] = compile_regions if self.regional else torch.compile
        return compile_fn(module, **self.kwargs)


def resolve_compile(recipe_compile: bool) -> CompileChoice | None:
    """Compile when ``run.compile`` or the launcher's ``dynamo_backend`` asks; None: not at all."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    plugin = TorchDynamoPlugin()  # the launcher's ACCELERATE_DYNAMO_* settings
    if plugin.backend == DynamoBackend.NO:
        return CompileChoice() if recipe_compile else None
    source = f"{'run.compile, ' if recipe_compile else ''}the launcher's dynamo_backend {plugin.backend.value.lower()}"
    return CompileChoice(plugin.to_kwargs(), bool(plugin.use_regional_compilation), source)


# --------------------------------------------------------------------------- processes


def refuse_unsupported() -> None:
    """Refuse a launch for FSDP, DeepSpeed or Megatron-LM: the engine trains whole copies of each network."""
    for env, what, option, kind in _UNSUPPORTED:
        if not _on(env):
            continue
        args = _launch_args()
        path = _config_file(args) if args is not None else None
        ddp = "accelerate launch --multi_gpu --num_processes 2 -m mutualkd run RECIPE"
        if path is not None and str(_config_value(path, "distributed_type")).upper().endswith(kind):
            where, asked = str(path), f"distributed_type: {kind}"
            hint = (f"set distributed_type to NO, MULTI_CPU or MULTI_GPU in {path} (or run accelerate config"
                    f" again), or launch with options only: {ddp}")
        else:
            where, asked = "accelerate launch", f"{option} ({env}=true)"
            hint = (f"launch without {option}, and with an accelerate config whose distributed_type is NO,"
                    f" MULTI_CPU or MULTI_GPU if one is read, e.g. {ddp}")
        raise UserError(f"{asked} asks for {what}; mutualkd trains with {SUPPORTED} only", where=where, hint=hint)


def single_process_note(num_processes: int) -> str | None:
    """What to say when ``accelerate launch --num_processes N`` started one process.

    Without ``--multi_gpu`` (``--cpu`` included) the launcher runs the script once, whatever
    ``--num_processes`` says.
    """
    args = _launch_args() if num_processes == 1 else None
    if args is None or not args.num_processes or args.num_processes < 2:
        return None
    n = args.num_processes
    return (f"accelerate launch --num_processes {n} started one process: without --multi_gpu (and with --cpu)"
            f" it runs the script once. For {n} processes on CPUs: accelerate launch --multi_gpu"
            f" --num_processes {n} -m mutualkd run RECIPE --set run.device=cpu")

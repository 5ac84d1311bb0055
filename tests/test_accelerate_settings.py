"""What ``accelerate launch`` and its config file ask of a run: precision, compilation, backends.

A recipe that leaves ``run.mixed_precision`` unset takes the launcher's; one that sets it wins,
with a note. Each network is compiled once, whether ``run.compile`` or the launcher's
``dynamo_backend`` asks. FSDP and DeepSpeed launches are refused before anything is written.
Most cases run in this process with the environment the launcher would set; one real
``accelerate launch`` checks the whole path, where the launcher is found.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import subprocess
import sys
import tomllib
from typing import Any

from accelerate.commands.launch import launch_command_parser
import pytest
import torch
from torch import nn

from mutualkd.engine import launcher
from mutualkd.errors import RecipeError, UserError
from mutualkd.runlog import dump_toml

BIN = Path(sys.executable).parent
SMALL_TEST = {"test_subset": 50}
TINY = ("run.progress=false", "run.max_steps=2", "run.epochs=1", "data.batch_size=8", "data.eval_batch_size=64",
        "data.test_subset=50")


@pytest.fixture
def launched_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """``launched_with(*options, **env)``: as if ``accelerate launch OPTIONS`` had started this process.

    The launcher's settings reach its processes as environment variables; its command line is
    what says where they came from. No default accelerate config file is read (HF_HOME is empty).
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)

    def launch(*options: str, **env: str) -> None:
        args = launch_command_parser().parse_args([*options, "-m", "mutualkd", "run", "r.toml"])
        monkeypatch.setattr(launcher, "_launch_args", lambda: args)
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    return launch


def _conv_dtypes(trainer: Any) -> list[torch.dtype]:
    """The output dtypes of one convolution per peer while training (filled as the run goes)."""
    dtypes: list[torch.dtype] = []
    for m in (trainer.unwrapped(n) for n in trainer.peer_names):
        conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
        conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype) if mod.training else None)
    return dtypes


# --------------------------------------------------------------------------- mixed precision


def test_unset_precision_takes_the_launchers(tmp_path, launched_with, make_trainer, caplog):
    launched_with("--mixed_precision", "bf16", ACCELERATE_MIXED_PRECISION="bf16")
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST)
    assert (tr.precision_choice.mode, tr.precision_choice.source) == ("bf16", "accelerate launch --mixed_precision")
    assert tr.recipe.run.mixed_precision == "bf16"  # recipe.toml records it: a resume trains the same way
    dtypes = _conv_dtypes(tr)
    summary = tr.fit()
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes  # the engine's autocast follows the launcher
    out = caplog.text  # records of the mutualkd loggers
    assert "mixed precision bf16 (from accelerate launch --mixed_precision)" in out and "note:" not in out
    assert summary["mixed_precision"] == "bf16"  # where it came from is the start line's (a resume reads recipe.toml)
    assert tomllib.loads((tr.run_dir / "recipe.toml").read_text())["run"]["mixed_precision"] == "bf16"


def test_precision_from_the_accelerate_config_file(tmp_path, launched_with, make_trainer):
    config = tmp_path / "bf16.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n")
    launched_with("--config_file", str(config), ACCELERATE_MIXED_PRECISION="bf16")
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST)
    assert (tr.precision_choice.mode, tr.precision_choice.source) == ("bf16", f"accelerate config {config}")
    assert tr.precision.dtype == torch.bfloat16


def test_no_launcher_precision_is_the_default(tmp_path, launched_with, make_trainer):
    launched_with(ACCELERATE_MIXED_PRECISION="no")  # accelerate launch without --mixed_precision nor config
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST)
    assert (tr.precision_choice.mode, tr.precision_choice.source) == ("no", "default")
    assert tr.precision.dtype is None and tr.recipe.run.mixed_precision == "no"


def test_the_recipe_wins_with_a_note(tmp_path, launched_with, make_trainer, caplog):
    launched_with("--mixed_precision", "bf16", ACCELERATE_MIXED_PRECISION="bf16")
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST, run={"mixed_precision": "no"})
    out = caplog.text
    assert "launcher asked for mixed precision 'bf16' (accelerate launch --mixed_precision)" in out
    assert 'run.mixed_precision = "no"' in out
    assert (tr.precision_choice.mode, tr.precision_choice.source) == ("no", "recipe") and tr.precision.dtype is None


def test_launcher_fp16_on_cpu_is_refused(tmp_path, launched_with, make_trainer):
    launched_with("--mixed_precision", "fp16", ACCELERATE_MIXED_PRECISION="fp16")
    with pytest.raises(RecipeError, match=r"fp16.*from accelerate launch --mixed_precision.*needs a GPU") as e:
        make_trainer(tmp_path, max_steps=1)
    assert "--mixed_precision bf16" in str(e.value) and not (tmp_path / "t").exists()


def test_launcher_fp8_is_refused(tmp_path, launched_with, make_trainer):
    launched_with("--mixed_precision", "fp8", ACCELERATE_MIXED_PRECISION="fp8")
    with pytest.raises(UserError, match='"fp8".*not one this engine runs'):
        make_trainer(tmp_path, max_steps=1)


# --------------------------------------------------------------------------- compilation


@pytest.mark.parametrize("recipe_compile, backend", [(True, None), (False, "INDUCTOR"), (True, "INDUCTOR")])
def test_each_network_is_compiled_once(tmp_path, launched_with, make_trainer, monkeypatch, recipe_compile, backend):
    calls: list[dict[str, Any]] = []

    def fake_compile(module: nn.Module, **kwargs: Any) -> nn.Module:
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    launched_with(**({"ACCELERATE_DYNAMO_BACKEND": backend} if backend else {}))
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST, run={"compile": recipe_compile})
    assert len(calls) == len(tr.peer_names) == 2, calls  # Accelerate's prepare() compiled nothing
    assert all(c == ({"backend": "inductor"} if backend else {}) for c in calls), calls
    assert ("dynamo_backend inductor" in tr.compile_choice.source) == bool(backend)


def test_no_compilation_unless_asked(tmp_path, launched_with, make_trainer, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    launched_with(ACCELERATE_DYNAMO_BACKEND="NO")
    assert make_trainer(tmp_path, max_steps=1, data=SMALL_TEST).compile_choice is None


# --------------------------------------------------------------------------- processes and backends


def test_fsdp_config_file_is_refused(tmp_path, launched_with, make_trainer):
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 1\n")
    launched_with("--config_file", str(config), ACCELERATE_USE_FSDP="true")
    with pytest.raises(UserError) as e:
        make_trainer(tmp_path, max_steps=1)
    assert e.value.where == str(config) and "distributed_type: FSDP" in str(e.value)
    assert "MULTI_GPU" in e.value.hint and not (tmp_path / "t").exists()


def test_deepspeed_launch_exits_2_before_writing(tmp_path, run_cli, subprocess_env, quickstart_recipe, folder_snapshot,
                                                 set_options):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dump_toml(tomllib.loads(quickstart_recipe.read_text())))
    before = folder_snapshot(tmp_path)
    env = subprocess_env(ACCELERATE_USE_DEEPSPEED="true", HF_HOME=str(tmp_path / "hf"))
    proc = run_cli(["run", str(recipe), *set_options(f"run.out_dir={json.dumps(str(tmp_path / 'runs'))}", *TINY)],
                   env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--use_deepspeed (ACCELERATE_USE_DEEPSPEED=true) asks for DeepSpeed" in proc.stderr
    assert "data parallel over GPUs (DDP)" in proc.stderr and "fix: launch without --use_deepspeed" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert folder_snapshot(tmp_path) == before


def test_single_process_of_a_launch_for_two_is_reported(launched_with):
    launched_with("--cpu", "--num_processes", "2")
    note = launcher.single_process_note(1)
    assert note and "accelerate launch --multi_gpu --num_processes 2 -m mutualkd run RECIPE" in note
    assert launcher.single_process_note(2) is None
    launched_with("--num_processes", "1")
    assert launcher.single_process_note(1) is None


def test_accelerate_launch_mixed_precision_bf16(tmp_path, quickstart_recipe, subprocess_env, set_options):
    """The real launcher: ``accelerate launch --mixed_precision bf16 --num_processes 1 -m mutualkd run``."""
    out = tmp_path / "runs"
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"))  # no accelerate config file of this machine's
    for name in [k for k in env if k.startswith("ACCELERATE_")]:
        env.pop(name)
    cmd = [str(BIN / "accelerate"), "launch", "--mixed_precision", "bf16", "--num_processes", "1",
           "--num_machines", "1", "--dynamo_backend", "no", "-m", "mutualkd", "run", str(quickstart_recipe),
           *set_options(f"run.out_dir={json.dumps(str(out))}", "run.name=bf16", *TINY)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "run: 1 process on cpu; mixed precision bf16 (from accelerate launch --mixed_precision)" in proc.stdout
    summary = json.loads((out / "bf16" / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"  # where it came from is the start line's (a resume reads recipe.toml)
    assert summary["num_processes"] == 1 and summary["global_steps"] == 2
    assert tomllib.loads((out / "bf16" / "recipe.toml").read_text())["run"]["mixed_precision"] == "bf16"

"""The benchmark (benchmarks/: cases, reference loops, measuring, rounds, bench_engine.py) and
the engine's speed knobs on CPU.

* The three implementations the benchmark compares run the passes it claims: the engine
  and the hand-written loops the minimum (KL-DML alternating 2N-1, simultaneous N, IE-DML
  N=2 three), the naive loops N^2 / N / 8; and the hand-written loops compute the same
  update as the engine (identical weights after one batch), so the timing compares like
  with like.
* The knobs a recipe has for speed: ``run.mixed_precision`` (bf16 autocast on CPU; fp16's
  loss scaling, one scale update per iteration), ``run.channels_last``, ``run.compile``,
  cuDNN autotuning unless ``run.deterministic``.

Runs are tiny (digits at 8x8, batch 8, one or two steps). No timing is asserted. Everything
goes through the engine's public API (callbacks, ``train_step``, ``unwrapped``, ``precision``).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Callable
import importlib.util
import math
from pathlib import Path
import sys
from typing import Any

from accelerate.state import AcceleratorState
import pytest
import torch
from torch import nn

from mutualkd.data import BatchLoader, Split
from mutualkd.engine import Callback
from mutualkd.errors import RecipeError

#: The factory fixtures used here: make_trainer, read_metrics, step_terms (tests/fixtures/); the two below.
Factory = Callable[..., Any]

REPO = Path(__file__).resolve().parent.parent


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "benchmarks" / "bench_engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


bench = _load_bench()  # puts benchmarks/ on sys.path: its sibling modules import by name
import cases  # noqa: E402
import measure  # noqa: E402
import reference  # noqa: E402
import rounds  # noqa: E402

CASES = {c.name: c for c in cases.CASES}


def tiny(**kw: Any) -> Any:
    """Benchmark settings for a test: digits at their native 8x8, batch 8, one warm-up and one timed batch."""
    base = dict(batch_size=8, image_size=8, warmup=1, steps=1, repeats=1)
    base.update(kw)
    return cases.Settings(**base)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny; one thread avoids OpenMP's slow-down on a loaded machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def fresh_accelerator() -> Iterator[None]:
    """Accelerate keeps one process-wide state, fixed by the first Accelerator's mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def finite_terms(read_metrics: Factory, step_terms: Factory) -> Callable[[Path], list[dict[str, float]]]:
    """``finite_terms(run_dir)``: the loss terms of each step the run logged; fails unless there are
    some and every one is finite."""

    def check(run_dir: Path) -> list[dict[str, float]]:
        terms = step_terms(read_metrics(run_dir))
        assert terms, "no step was logged"
        for flat in terms:
            assert flat and all(math.isfinite(v) for v in flat.values()), flat
        return terms

    return check


# ============================================================================ forward passes


def test_forward_pass_formulas() -> None:
    n = {c: (cases.min_forwards(CASES[c]), cases.naive_forwards(CASES[c])) for c in CASES}
    assert n == {
        "kl_dml_alt_n2": (3, 4),
        "kl_dml_alt_n3": (5, 9),
        "kl_dml_alt_n4": (7, 16),
        "kl_dml_sim_n2": (2, 2),
        "ie_dml_alt_n2": (3, 8),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_forward_passes_per_batch(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    result = rounds.run_case(case, tiny(), tmp_path, log=lambda _: None)
    impls = result["impls"]
    assert impls["engine"]["forwards_per_batch"] == cases.min_forwards(case)
    assert impls["engine"]["forwards_per_batch_engine_count"] == cases.min_forwards(case)  # trainer.last_forward_passes
    assert impls["hand"]["forwards_per_batch"] == cases.min_forwards(case)
    assert impls["naive"]["forwards_per_batch"] == cases.naive_forwards(case)
    for v in impls.values():
        assert v["images_per_s"] > 0 and 0 <= v["data_wait_share"] < 1


def test_rounds_interleave_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round by round, the engine's window and then each loop's, over one engine epoch,
    every implementation seeing the same batches in the same order."""
    seen: list[tuple[str, list[int]]] = []

    class EngineBatches(Callback):
        def on_batch_start(self, trainer: Any, inputs: torch.Tensor, labels: torch.Tensor) -> None:
            seen.append(("engine", labels.tolist()))

    loop_for = rounds.loop_for

    def recording_loop_for(case: Any, impl: str) -> Any:
        fn = loop_for(case, impl)

        def loop_batch(m: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> None:
            seen.append((impl, y.tolist()))
            fn(m, x, y, **kw)

        return loop_batch

    monkeypatch.setattr(rounds, "loop_for", recording_loop_for)
    s = tiny(warmup=1, steps=2, repeats=3)
    result = rounds.run_case(CASES["kl_dml_alt_n2"], s, tmp_path, log=lambda _: None, callbacks=[EngineBatches()])
    assert {impl: len(ws) for impl, ws in result["windows"].items()} == {"engine": 3, "hand": 3, "naive": 3}
    for ws in result["windows"].values():
        assert all(w["batches"] == 2 and w["images"] == 2 * s.batch_size for w in ws)
        assert all(0 < w["step_seconds"] <= w["seconds"] for w in ws)
    assert len(result["paired"]["hand"]["rounds"]) == 3
    timing = seen[: 3 * (1 + 2 * 3)]  # then the memory windows
    who = [impl for impl, _ in timing]
    # warm-up round, then rounds of 2 batches whose loop order rotates
    assert who == (["engine", "hand", "naive"]
                   + ["engine"] * 2 + ["naive"] * 2 + ["hand"] * 2
                   + ["engine"] * 2 + ["hand"] * 2 + ["naive"] * 2
                   + ["engine"] * 2 + ["naive"] * 2 + ["hand"] * 2)
    batches = {impl: [y for i, y in timing if i == impl] for impl in ("engine", "hand", "naive")}
    assert batches["engine"] == batches["hand"] == batches["naive"]
    assert len({tuple(y) for y in batches["engine"]}) == 7  # distinct batches, not one repeated


def test_a_plan_longer_than_an_epoch_is_refused(tmp_path: Path) -> None:
    trainer = cases.build_trainer(CASES["kl_dml_alt_n2"], tiny(), tmp_path)
    n = len(trainer.train_loader)
    with pytest.raises(SystemExit, match=f"do not fit in one epoch \\({n} batches"):
        measure.EngineRunner(trainer).run([1, n], lambda i: None)


def test_paired_ratios_take_the_median_of_rounds() -> None:
    def w(seconds: float, batches: int = 2) -> Any:
        return measure.Window(seconds=seconds, cpu_seconds=seconds / 2, batches=batches, images=8 * batches)

    windows = {"engine": [w(1.0), w(2.0), w(1.0)], "hand": [w(1.0), w(1.8), w(5.0)]}
    got = measure.paired_ratios(windows)
    assert got["hand"]["rounds"] == pytest.approx([1.0, 0.9, 5.0])
    assert got["hand"]["median"] == pytest.approx(1.0)  # the outlier round does not move it
    assert measure.paired_ratios({"hand": windows["hand"]}) == {}


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", ["kl_dml_alt_n3", "kl_dml_sim_n2", "ie_dml_alt_n2"])
def test_hand_written_loop_matches_the_engine(name: str, tmp_path: Path) -> None:
    """Same weights, same batch, one update: the hand-written loop lands where the engine does."""
    case = CASES[name]
    s = tiny()
    trainer = cases.build_trainer(case, s, tmp_path)
    hand = reference.clone_modules(trainer)
    before = [_params(p) for p in hand.peers]
    split = Split(trainer.train_loader.images, trainer.train_loader.labels)
    loader = BatchLoader(split, trainer.info, batch_size=s.batch_size, device="cpu", train=True,
                         augment=True, seed=s.seed)
    measure.EngineRunner(trainer).run([1], lambda i: None)
    measure.LoopRunner("hand", reference.loop_for(case, "hand"), hand, loader, torch.device("cpu"),
                       reference.no_amp, None).window(1)
    names = trainer.peer_names
    for i, (name, hand_peer) in enumerate(zip(names, hand.peers)):
        e, h = _params(trainer.unwrapped(name)), _params(hand_peer)
        assert any(not torch.equal(a, b) for a, b in zip(h, before[i])), "the hand loop did not update peer"
        for a, b in zip(e, h):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(hand.aes) == (len(names) if case.strategy == "ie_dml" else 0)
    assert len(hand.encs) == (len(names) * (len(names) - 1) if case.strategy == "ie_dml" else 0)
    for i, ae in enumerate(hand.aes):
        for a, b in zip(_params(trainer.unwrapped(f"{names[i]}.ae")), _params(ae)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (si, ti), enc in hand.encs.items():
        for a, b in zip(_params(trainer.unwrapped(f"{names[si]}.ie.{names[ti]}")), _params(enc)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_naive_loop_sends_gradients_into_every_peer(tmp_path: Path) -> None:
    """What makes the naive loop expensive: one peer's loss backpropagates through the others."""
    trainer = cases.build_trainer(CASES["kl_dml_alt_n2"], tiny(), tmp_path)
    m = reference.clone_modules(trainer)
    x, y = next(iter(trainer.train_loader))
    logits = [p(x)[1] for p in m.peers]
    reference.naive_kl_loss(logits, 0, y).backward()
    assert all(p.grad is not None for p in m.peers[1].parameters() if p.requires_grad)


def test_report_tables_and_targets(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    report = bench.main([
        "--cases", "kl_dml_alt_n2,kl_dml_alt_n3", "--batch-size", "8", "--image-size", "8", "--warmup", "1", "--steps", "1",
        "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--json-out", str(out_json), "--md-out", str(out_md),
    ])
    md = out_md.read_text(encoding="utf-8")
    assert "| kl_dml_alt_n2 | engine |" in md and "engine/naive" in md and "time per batch / N" in md
    assert out_json.exists()
    targets = report["targets"]
    assert targets["cases"]["kl_dml_alt_n2"]["forwards"]["pass"] is True
    assert set(targets["linearity"]["per_n"]) == {2, 3}
    assert targets["linearity"]["pass"] in (True, False)


# ============================================================================ knobs


def test_bf16_autocast_on_cpu(tmp_path: Path, fresh_accelerator: None, make_trainer: Factory,
                              finite_terms: Factory) -> None:
    trainer = make_trainer(tmp_path, run={"mixed_precision": "bf16", "max_steps": 2}, data={"test_subset": 20})
    dtypes: list[torch.dtype] = []
    for m in (trainer.unwrapped(n) for n in trainer.peer_names):
        # Look inside the peer, at a convolution: what runs in bf16, whatever the output dtype.
        conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
        conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype) if mod.training else None)
    trainer.fit()
    finite_terms(trainer.run_dir)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes


def test_channels_last(tmp_path: Path, make_trainer: Factory, finite_terms: Factory) -> None:
    trainer = make_trainer(tmp_path, run={"channels_last": True, "max_steps": 2}, data={"test_subset": 20})
    layouts: list[bool] = []
    for m in (trainer.unwrapped(n) for n in trainer.peer_names):
        m.register_forward_pre_hook(
            lambda mod, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    trainer.fit()
    finite_terms(trainer.run_dir)
    assert layouts and all(layouts)


def _compile_works() -> str | None:
    """None when torch.compile can build a CPU kernel here, else the reason it cannot."""
    try:
        fn = torch.compile(lambda t: torch.relu(t) * 2)
        fn(torch.randn(4))
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain means "not here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@pytest.mark.slow
def test_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_trainer: Factory, finite_terms: Factory) -> None:
    reason = _compile_works()
    if reason is not None:
        pytest.skip(f"torch.compile does not work on this machine ({reason})")
    compile_ = torch.compile
    compiled: list[tuple[nn.Module, nn.Module]] = []  # (argument, compiled wrapper)

    def recording_compile(model: Any, *args: Any, **kwargs: Any) -> Any:
        wrapper = compile_(model, *args, **kwargs)
        compiled.append((model, wrapper))
        return wrapper

    monkeypatch.setattr(torch, "compile", recording_compile)
    trainer = make_trainer(tmp_path, run={"compile": True, "max_steps": 2}, data={"test_subset": 20})
    monkeypatch.setattr(torch, "compile", compile_)
    # Every peer, and nothing else, went through torch.compile (one device: no DDP around it).
    assert [model for model, _ in compiled] == [trainer.unwrapped(n) for n in trainer.peer_names]
    calls = [0]
    for model, wrapper in compiled:
        assert isinstance(wrapper, nn.Module) and wrapper is not model
        wrapper.register_forward_pre_hook(lambda mod, args: calls.__setitem__(0, calls[0] + 1) if mod.training else None)
    trainer.fit()
    finite_terms(trainer.run_dir)
    assert trainer.last_forward_passes == 3
    assert calls[0] == 3 * 2  # the training forwards ran through the compiled wrappers


class _Counting:
    """Wraps a bound method, counting calls."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *a: Any, **k: Any) -> Any:
        self.calls += 1
        return self.fn(*a, **k)


@pytest.fixture
def fp16_trainer(make_trainer: Factory) -> Callable[..., Any]:
    """``fp16_trainer(tmp_path, **kw)``: a trainer whose fp16 loss scaling goes through
    ``trainer.precision.scaler``.

    On a GPU that is a real fp16 run. On a CPU the engine refuses fp16 (see
    test_fp16_on_cpu_is_refused), so the run is fp32 with a CPU GradScaler put in the
    engine's place: the scaler path of the training loop is the same.
    """

    def make(tmp_path: Path, **kw: Any) -> Any:
        run = dict(kw.pop("run", {}))
        if torch.cuda.is_available():
            trainer = make_trainer(tmp_path, run={**run, "mixed_precision": "fp16", "device": "auto"}, **kw)
            assert trainer.precision.scaler is not None
        else:
            trainer = make_trainer(tmp_path, run=run, **kw)
            assert trainer.precision.scaler is None
            trainer.precision.scaler = torch.amp.GradScaler("cpu")
        return trainer

    return make


def test_fp16_scaler_updates_once_per_iteration(tmp_path: Path, fresh_accelerator: None, finite_terms: Factory,
                                                fp16_trainer: Factory) -> None:
    k = 3
    trainer = fp16_trainer(tmp_path, peers=3, mode="alternating", run={"max_steps": k}, data={"test_subset": 20})
    scaler = trainer.precision.scaler
    update, step = _Counting(scaler.update), _Counting(scaler.step)
    scaler.update, scaler.step = update, step  # type: ignore[method-assign]
    trainer.fit()
    finite_terms(trainer.run_dir)
    assert trainer.position.global_step == k
    assert update.calls == k  # once per iteration, after all three optimizers stepped
    assert step.calls == 3 * k
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0


def test_fp16_ie_dml_three_peers(tmp_path: Path, fresh_accelerator: None, finite_terms: Factory,
                                 fp16_trainer: Factory) -> None:
    """IE-DML with N > 2 steps an autoencoder's unit twice per batch, which one GradScaler allows
    only with an update in between (GradScaler raises otherwise)."""
    trainer = fp16_trainer(tmp_path, strategy="ie_dml", peers=3, run={"max_steps": 2}, data={"test_subset": 20})
    trainer.fit()
    finite_terms(trainer.run_dir)


def test_fp16_on_cpu_is_refused(tmp_path: Path, fresh_accelerator: None, make_trainer: Factory) -> None:
    # Accelerate ignores fp16 on a CPU (no autocast, no scaler): a silent fp32 run.
    with pytest.raises(RecipeError, match="fp16"):
        make_trainer(tmp_path, run={"mixed_precision": "fp16", "device": "cpu", "max_steps": 1})


def test_cudnn_benchmark_unless_deterministic(tmp_path: Path, make_trainer: Factory) -> None:
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        make_trainer(tmp_path, name="fast", run={"deterministic": False})
        assert torch.backends.cudnn.benchmark is True
        make_trainer(tmp_path, name="exact", run={"deterministic": True})
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2])


def test_profile_step_compares_the_two_steps(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--case", "kl_dml_alt_n2", "--batch-size", "8", "--batches", "2", "--profile", "--top", "5"])
    out = capsys.readouterr().out
    assert "kl_dml_alt_n2, batch 8" in out and "median of per-batch hand/engine" in out
    assert "own time, engine minus hand" in out
    assert len(out.strip().splitlines()) == 2 + 1 + 5  # summary, blank, header, top 5

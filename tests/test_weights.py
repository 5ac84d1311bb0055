"""Where weights come from (mutualkd.weights): every kind of source, heads, keys, normalisation, frozen peers.

The networks are real timm models; the weights files are written here with
``safetensors.torch.save_file`` / ``torch.save``, as any program would. Nothing is downloaded:
timm's pretrained weights come from a Hugging Face cache entry this file writes under a
temporary ``HF_HUB_CACHE`` (``write_hub_entry``), which timm then loads through its own
``create_model(..., pretrained=True)`` path with the cached file as its ``file`` source.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import socket
from typing import Any

import pytest
from safetensors.torch import save_file
import timm
import torch
from typer.testing import CliRunner

from mutualkd import checkpoint as ckpt
from mutualkd.cli import app
from mutualkd.config import parse_recipe
from mutualkd.engine import Trainer, check_recipe
from mutualkd.errors import CheckpointError, RecipeError, UserError
from mutualkd.peers import InputNorm, input_norm
from mutualkd.weights import load_network, parse_source

import mutualkd.models  # noqa: F401  (the CIFAR families in timm)

#: The factory fixtures of tests/fixtures/ used here (recipe_dict, subprocess_env).
Factory = Callable[..., Any]

DIGITS = {"num_classes": 10, "in_chans": 1}


def _load(source: str | None, model: str | None, **kw: Any):
    return load_network(source, model=model, file="r.toml", field="peers[0].weights", **DIGITS, **kw)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm resnet18 for digits (10 classes, 1 channel), saved with safetensors.torch.save_file."""
    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("w") / "resnet18_digits.safetensors"
    save_file(model.state_dict(), str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test, and no network: any connection attempt fails the test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("MUTUALKD_ALLOW_DOWNLOAD", raising=False)

    def no_network(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"a network connection was attempted: {a[:1]}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def _write_imagenet_resnet18(cache: Path, write_hub_entry: Callable[..., Path]) -> dict[str, torch.Tensor]:
    """timm/resnet18.a1_in1k in the cache: a random 1000-class, 3-channel resnet18 (not the real weights)."""
    torch.manual_seed(2)
    sd = timm.create_model("resnet18").state_dict()
    write_hub_entry(cache, "timm/resnet18.a1_in1k", {"model.safetensors": lambda p: save_file(sd, str(p))})
    return sd


# --------------------------------------------------------------------------- parsing a source
def test_source_kinds(tmp_path: Path, tiny_run: Path, resnet18_file) -> None:
    where = "r.toml [peers[0].weights]"
    assert parse_source(str(tiny_run), where=where).kind == "run"
    assert parse_source(str(ckpt.latest_checkpoint(tiny_run / "checkpoints")), where=where).kind == "run"
    assert parse_source(str(resnet18_file[0]), where=where).kind == "file"
    assert parse_source("resnet34.a1_in1k", where=where).kind == "timm"
    assert parse_source("hf-hub:timm/resnet18.a1_in1k", where=where).location == "timm/resnet18.a1_in1k"
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert parse_source(str(folder), where=where).kind == "folder"
    assert parse_source(f"local-dir:{folder}", where=where).kind == "folder"


def test_source_that_is_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        parse_source(str(tmp_path / "nowhere.safetensors"), where="r.toml [peers[0].weights]")
    assert str(tmp_path / "nowhere.safetensors") in str(e.value) and "[peers[0].weights]" in str(e.value)
    with pytest.raises(UserError, match="no timm model name") as e:
        parse_source("resnet1888", where="w")
    assert "resnet18" in str(e.value)  # a close match
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a weights file"):
        parse_source(str(tmp_path / "notes.txt"), where="w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a mutualkd run"):
        parse_source(str(tmp_path / "empty"), where="w")


# --------------------------------------------------------------------------- files
def test_safetensors_file_loads_exactly(resnet18_file) -> None:
    path, sd = resnet18_file
    net = _load(str(path), "resnet18")
    for k, v in net.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert net.mean is None  # a bare file says nothing of its normalisation: the data set's


@pytest.mark.parametrize("suffix, wrap", [
    (".pth", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}),
    (".pt", lambda sd: {"model": sd}),
    (".bin", lambda sd: sd),
])
def test_torch_state_dict_files_and_their_wrappers(tmp_path: Path, suffix: str, wrap: Callable[..., Any]) -> None:
    sd = timm.create_model("cifar_resnet20", **DIGITS).state_dict()
    path = tmp_path / f"w{suffix}"
    torch.save(wrap(sd), path)
    net = _load(str(path), "cifar_resnet20")
    assert all(torch.equal(v, sd[k]) for k, v in net.model.state_dict().items())


def test_a_bare_file_needs_its_architecture(resnet18_file) -> None:
    with pytest.raises(UserError, match="does not say which architecture"):
        load_network(str(resnet18_file[0]), model=None, file="r.toml", field="strategy.teacher", **DIGITS)


def test_mismatched_keys_name_the_first_missing_and_unexpected(tmp_path: Path) -> None:
    sd = timm.create_model("cifar_resnet20", **DIGITS).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "r20.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError) as e:
        _load(str(path), "cifar_resnet32")
    text = str(e.value)
    assert "do not fit model 'cifar_resnet32'" in text and "missing (first: 'layer1.3." in text
    assert "unexpected (first: 'extra.weight'" in text and "[peers[0].weights]" in text


def test_a_head_for_other_classes_is_refused_unless_reset(tmp_path: Path) -> None:
    sd = timm.create_model("cifar_resnet20", num_classes=7, in_chans=1).state_dict()
    path = tmp_path / "seven.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError) as e:
        _load(str(path), "cifar_resnet20")
    assert "7 classes" in str(e.value) and "has 10" in str(e.value) and "reset_head" in str(e.value)
    net = _load(str(path), "cifar_resnet20", reset_head=True)
    assert net.head_reset and net.model.fc.out_features == 10
    assert torch.equal(net.model.conv1.weight, sd["conv1.weight"])


def test_three_channel_weights_adapted_to_one_channel(tmp_path: Path) -> None:
    sd = timm.create_model("cifar_resnet20", num_classes=10, in_chans=3).state_dict()
    path = tmp_path / "rgb.safetensors"
    save_file(sd, str(path))
    net = _load(str(path), "cifar_resnet20")
    assert torch.allclose(net.model.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    assert any("adapted from 3 to 1" in n for n in net.notes)


# --------------------------------------------------------------------------- runs and folders
def test_run_source_with_a_peer_name(tiny_run: Path) -> None:
    net = _load(str(tiny_run), None, peer="peer1")
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tiny_run / "checkpoints"))["modules"]["peer1"]
    assert net.model_name == "cifar_wrn_16_1"
    assert all(torch.equal(v, saved[k]) for k, v in net.model.state_dict().items())
    with pytest.raises(CheckpointError, match="expects a 'cifar_resnet56'") as e:
        load_network(str(tiny_run), model="cifar_resnet56", file="r.toml", field="peers[0].weights",
                     arch_field="peers[0].model", **DIGITS)
    assert "[peers[0].model]" in str(e.value)


def test_timm_model_folder_and_its_normalisation(tmp_path: Path) -> None:
    from timm.models import save_for_hf

    model = timm.create_model("cifar_resnet20", **DIGITS)
    save_for_hf(model, str(tmp_path / "m"), safe_serialization=True,
                data_config={"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)})
    for source in (str(tmp_path / "m"), f"local-dir:{tmp_path / 'm'}"):
        net = _load(source, "cifar_resnet20")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.model.state_dict().items())
        assert net.mean == (0.5,) and net.std == (0.25,)


def test_input_norm_maps_the_data_normalisation_to_the_weights_one() -> None:
    pixels = torch.rand(2, 3, 4, 4)
    data_mean, data_std, mean, std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (pixels - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    want = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    norm = input_norm(data_mean, data_std, mean, std)
    assert isinstance(norm, InputNorm)
    torch.testing.assert_close(norm(x), want)
    assert input_norm(data_mean, data_std, data_mean, data_std) is None  # the same: nothing to do
    assert input_norm(data_mean, data_std, None, None) is None


# --------------------------------------------------------------------------- timm pretrained, offline
def test_pretrained_not_in_the_cache_names_tag_cache_and_fix(hub_cache: Path) -> None:
    with pytest.raises(UserError) as e:
        load_network(None, model="resnet18", pretrained=True, file="r.toml", field="peers[0].pretrained",
                     reset_head=True, **DIGITS)
    text = str(e.value)
    assert "'resnet18.a1_in1k'" in text and str(hub_cache / "models--timm--resnet18.a1_in1k") in text
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in text and "MUTUALKD_ALLOW_DOWNLOAD=1" in text
    assert "[peers[0].pretrained]" in text


def test_downloads_only_when_allowed(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    import timm.models._hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: only MUTUALKD_ALLOW_DOWNLOAD decides
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts: list[str] = []

    def fake_download(repo_id: str, filename: str, **kw: Any) -> str:
        attempts.append(f"{repo_id}/{filename}")
        raise OSError("no network here")

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    with pytest.raises(UserError, match="not in the cache"):
        _load("resnet18.a1_in1k", "resnet18", reset_head=True)
    assert attempts == []  # not allowed: never tried
    monkeypatch.setenv("MUTUALKD_ALLOW_DOWNLOAD", "1")
    with pytest.raises(UserError, match="timm cannot load"):
        _load("resnet18.a1_in1k", "resnet18", reset_head=True)
    assert attempts and attempts[0].startswith("timm/resnet18.a1_in1k/")


@pytest.mark.parametrize("how", ["variable", "constant"])
def test_offline_hub_never_downloads_and_says_so(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """HF_HUB_OFFLINE (in the environment, or huggingface_hub's constant) wins over MUTUALKD_ALLOW_DOWNLOAD."""
    from huggingface_hub import constants
    import timm.models._hub as hub

    from mutualkd.weights import hub_offline

    monkeypatch.setenv("MUTUALKD_ALLOW_DOWNLOAD", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub_offline()
    if how == "variable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_offline()
    attempts: list[str] = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kw: attempts.append(repo_id))
    monkeypatch.setattr(hub, "load_model_config_from_hf", lambda *a, **kw: attempts.append(str(a)))
    for source, model in (("resnet18.a1_in1k", "resnet18"), ("hf-hub:someone/absent", "cifar_resnet20")):
        with pytest.raises(UserError) as e:
            _load(source, model, reset_head=True)
        text = " ".join(str(e.value).split())
        assert source in text and "HF_HUB_OFFLINE is set" in text and "offline" in text, text
        assert "unset HF_HUB_OFFLINE" in text and "HF_HUB_CACHE" in text and "local weights file" in text
    assert attempts == []


def test_offline_cli_exits_2_naming_the_source(hub_cache: Path, tmp_path: Path, recipe_dict: Factory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUTUALKD_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = recipe_dict(tmp_path)
    d["peers"][1] = {"model": "cifar_resnet20", "weights": "hf-hub:someone/tiny-r20", "frozen": True}
    (tmp_path / "r.toml").write_text(_toml(d))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.toml")])
    err = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in err, result.output
    assert "'hf-hub:someone/tiny-r20'" in err and "[peers[1].weights]" in err and "HF_HUB_OFFLINE is set" in err
    assert str(hub_cache / "models--someone--tiny-r20") in err


def test_pretrained_from_the_cache_through_timm(hub_cache: Path, write_hub_entry: Callable[..., Path]) -> None:
    """The cache entry is written here; timm loads it itself (create_model(pretrained=True), the file as source)."""
    sd = _write_imagenet_resnet18(hub_cache, write_hub_entry)
    with pytest.raises(UserError) as e:  # ImageNet's head on digits
        load_network(None, model="resnet18", pretrained=True, file="r.toml", field="peers[0].pretrained", **DIGITS)
    assert "1000 classes" in str(e.value) and "has 10" in str(e.value) and "reset_head = true" in str(e.value)
    net = load_network(None, model="resnet18", pretrained=True, file="r.toml", field="peers[0].pretrained",
                       reset_head=True, **DIGITS)
    got = net.model.state_dict()
    assert torch.equal(got["layer3.0.conv1.weight"], sd["layer3.0.conv1.weight"])
    assert torch.allclose(got["conv1.weight"], sd["conv1.weight"].sum(dim=1, keepdim=True))  # 3 -> 1 channel, by timm
    assert got["fc.weight"].shape == (10, 512) and net.head_reset
    assert net.mean == pytest.approx((0.485, 0.456, 0.406))  # the weights' normalisation, for an InputNorm
    with pytest.raises(UserError, match="weights of a 'resnet18', the recipe names 'resnet34'"):
        _load("resnet18.a1_in1k", "resnet34", reset_head=True)


def test_hf_hub_repository_from_the_cache(hub_cache: Path, write_hub_entry: Callable[..., Path]) -> None:
    from timm.models import save_for_hf

    model = timm.create_model("cifar_resnet20", **DIGITS)
    snapshot = write_hub_entry(hub_cache, "someone/tiny-r20", {})
    save_for_hf(model, str(snapshot), safe_serialization=True)
    net = _load("hf-hub:someone/tiny-r20", "cifar_resnet20")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.model.state_dict().items())
    with pytest.raises(UserError, match="not in the cache"):
        _load("hf-hub:someone/absent", "cifar_resnet20")


# --------------------------------------------------------------------------- recipes: keys and silent no-ops
@pytest.mark.parametrize("peer, says", [
    ({"model": "resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": "x.pth"}}}, "pretrained_cfg_overlay"),
    ({"model": "resnet18", "kwargs": {"checkpoint_path": "x.pth"}}, "checkpoint_path"),
    ({"model": "resnet18", "kwargs": {"pretrained": True}}, "pretrained = true next to model"),
    ({"model": "resnet18", "frozen": True}, "a frozen peer needs weights"),
    ({"model": "resnet18", "reset_head": True}, "no head to reset"),
    ({"model": "resnet18", "pretrained": True, "weights": "x.pth"}, "keep one of them"),
    ({"model": "resnet18", "weights_peer": "peer1"}, "weights_peer"),
])
def test_weights_keys_that_would_do_nothing_are_refused(tmp_path: Path, peer: dict[str, Any], says: str,
                                                        recipe_dict: Factory) -> None:
    d = recipe_dict(tmp_path)
    d["peers"][1] = peer
    with pytest.raises(RecipeError, match="peers") as e:
        parse_recipe(d, file="r.toml")
    assert says in str(e.value)


def _kd_recipe(recipe_dict: Callable[..., dict[str, Any]], tmp_path: Path, teacher: dict[str, Any], **kw: Any
               ) -> dict[str, Any]:
    d = recipe_dict(tmp_path, **{"max_steps": 4, **kw})
    d["peers"] = [{"model": "cifar_resnet20", "name": "student"}, {"name": "teacher", **teacher}]
    return d


def test_ie_dml_refuses_a_frozen_peer(tmp_path: Path, resnet18_file, recipe_dict: Factory) -> None:
    d = _kd_recipe(recipe_dict, tmp_path, {"model": "resnet18", "weights": str(resnet18_file[0]), "frozen": True},
                   strategy="ie_dml")
    with pytest.raises(RecipeError) as e:
        check_recipe(parse_recipe(d, file="r.toml"), recipe_file="r.toml", data=False)
    text = str(e.value)
    assert "takes no frozen peer" in text and "[peers[1].frozen]" in text and "kl_dml" in text and "ie_kd" in text


def test_kl_dml_refuses_a_frozen_peer_with_a_new_head(tmp_path: Path, recipe_dict: Factory) -> None:
    sd = timm.create_model("cifar_resnet20", num_classes=7, in_chans=1).state_dict()
    save_file(sd, str(tmp_path / "seven.safetensors"))
    d = _kd_recipe(recipe_dict, tmp_path, {"model": "cifar_resnet20", "weights": str(tmp_path / "seven.safetensors"),
                                           "frozen": True, "reset_head": True})
    with pytest.raises(RecipeError, match="predictions, the other peers' targets, would be random"):
        check_recipe(parse_recipe(d, file="r.toml"), recipe_file="r.toml")


# --------------------------------------------------------------------------- frozen peers in a run
def test_frozen_kl_dml_peer_is_classic_kd(tmp_path: Path, resnet18_file, recipe_dict: Factory) -> None:
    """A frozen file-weights teacher: no unit, eval mode, unchanged, one forward pass per batch."""
    path, sd = resnet18_file
    d = _kd_recipe(recipe_dict, tmp_path, {"model": "resnet18", "weights": str(path), "frozen": True}, max_steps=3)
    tr = Trainer(parse_recipe(d, file="r.toml"), recipe_file="r.toml")
    assert list(tr.units) == ["student"] and "teacher" in tr.frozen_modules
    assert [s.updates for s in tr.stages[0].steps] == [("student",)]
    teacher = tr.unwrapped("teacher")
    calls: list[int] = []
    teacher.model.forward_features = (lambda f: (lambda x: (calls.append(1), f(x))[1]))(teacher.model.forward_features)
    summary = tr.fit()
    assert len(calls) == 3 + 1  # one pass per training batch (3), one per evaluation batch (450 images, 1 batch)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, sd[k]), k  # BatchNorm statistics included: eval mode kept them
    assert summary["global_steps"] == 3 and "teacher" in summary["top1"]


def test_three_peers_with_one_frozen_alternate_over_the_trainable_ones(tmp_path: Path, resnet18_file,
                                                                       recipe_dict: Factory) -> None:
    d = _kd_recipe(recipe_dict, tmp_path, {"model": "resnet18", "weights": str(resnet18_file[0]), "frozen": True},
                   max_steps=1)
    d["peers"].insert(1, {"model": "cifar_wrn_16_1", "name": "other"})
    tr = Trainer(parse_recipe(d, file="r.toml"), recipe_file="r.toml")
    assert [s.updates for s in tr.stages[0].steps] == [("student",), ("other",)]
    tr.fit()
    # student, other, teacher, then student again after its update; the teacher is not recomputed
    assert tr.last_forward_passes == 4


def test_ie_kd_teacher_from_a_folder_gets_its_own_normalisation(tmp_path: Path, recipe_dict: Factory) -> None:
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("cifar_resnet20", **DIGITS), str(tmp_path / "tf"), safe_serialization=True,
                data_config={"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)})
    d = recipe_dict(tmp_path, peers=["cifar_resnet20"], max_steps=2,
                    strategy={"name": "ie_kd", "teacher": str(tmp_path / "tf"), "ae_epochs": 1})
    tr = Trainer(parse_recipe(d, file="r.toml"), recipe_file="r.toml")
    norm = tr.unwrapped("teacher").input_norm
    assert isinstance(norm, InputNorm) and norm.mean == (0.5,) and norm.std == (0.25,)
    assert tr.unwrapped("peer0").input_norm is None


def test_ie_kd_with_a_pretrained_teacher_from_the_cache(hub_cache: Path, write_hub_entry: Callable[..., Path],
                                                       tmp_path: Path, recipe_dict: Factory) -> None:
    """IE-KD's teacher as a timm tag (features only: a new head), on digits, loaded by timm from the cache."""
    sd = _write_imagenet_resnet18(hub_cache, write_hub_entry)
    d = recipe_dict(tmp_path, peers=["cifar_resnet20"], max_steps=2,
                    strategy={"name": "ie_kd", "teacher": "resnet18.a1_in1k", "teacher_model": "resnet18",
                              "teacher_reset_head": True, "ae_epochs": 1})
    tr = Trainer(parse_recipe(d, file="r.toml"), recipe_file="r.toml")
    teacher = tr.unwrapped("teacher")
    assert torch.equal(teacher.model.state_dict()["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])
    assert isinstance(teacher.input_norm, InputNorm)  # ImageNet's normalisation, not the digits'
    assert tr.fit()["global_steps"] == 2


# --------------------------------------------------------------------------- as a new user would, with the CLI
@pytest.mark.slow
def test_new_user_teachers_with_no_mutualkd_run_anywhere(tmp_path: Path, resnet18_file,
                                                         subprocess_env: Factory) -> None:
    """A safetensors resnet18 as IE-KD teacher and as frozen KL-DML peer; pretrained = true offline exits 2."""
    import subprocess
    import sys

    path = resnet18_file[0]
    common = ('[run]\nname = "{name}"\nmax_steps = 4\nprogress = false\ndevice = "cpu"\n'
              '[data]\ndataset = "digits"\nbatch_size = 16\n')
    recipes = {
        "iekd": common + '[[peers]]\nmodel = "cifar_resnet20"\n[strategy]\nname = "ie_kd"\n'
                f'teacher = {json.dumps(str(path))}\nteacher_model = "resnet18"\nae_epochs = 1\n',
        "kd": common + '[[peers]]\nmodel = "cifar_resnet20"\n[[peers]]\nname = "teacher"\nmodel = "resnet18"\n'
              f'weights = {json.dumps(str(path))}\nfrozen = true\n[strategy]\nname = "kl_dml"\n',
        "pre": common + '[[peers]]\nmodel = "cifar_resnet20"\n[[peers]]\nmodel = "resnet18"\npretrained = true\n'
               'reset_head = true\n[strategy]\nname = "kl_dml"\n',
    }
    env = subprocess_env(HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    env.pop("MUTUALKD_ALLOW_DOWNLOAD", None)
    for name, text in recipes.items():
        (tmp_path / f"{name}.toml").write_text(text.format(name=name))
        proc = subprocess.run([sys.executable, "-m", "mutualkd", "run", f"{name}.toml"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=300)
        if name == "pre":
            err = " ".join(proc.stderr.split())
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert "resnet18.a1_in1k" in err and str(tmp_path / "empty_cache" / "models--timm--resnet18.a1_in1k") in err
            assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in err
            assert not (tmp_path / "runs" / name).exists()
            continue
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["global_steps"] == 4
        assert "weights from weights file" in " ".join(proc.stdout.split())


def test_validate_names_a_missing_weights_file_without_data(tmp_path: Path, recipe_dict: Factory) -> None:
    d = recipe_dict(tmp_path)
    d["peers"][1] = {"model": "resnet18", "weights": "teachers/none.safetensors", "frozen": True}
    (tmp_path / "r.toml").write_text(_toml(d))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.toml"), "--no-data"])
    assert result.exit_code == 2
    assert "teachers/none.safetensors not found" in " ".join(result.stderr.split())


def _toml(d: dict[str, Any]) -> str:
    from mutualkd.runlog import dump_toml

    return dump_toml(d)


"""CIFAR ResNet / Wide ResNet models registered in timm's registry (mutualkd.models)."""

from __future__ import annotations

from collections.abc import Iterator
import importlib
from pathlib import Path
import warnings

import pytest
import timm
import torch

import mutualkd.models as models
from mutualkd.errors import UserError
from mutualkd.models import CIFAR_MODELS, NoPretrainedWeightsError, register_cifar_model

# WRN-28-10 (36.5M parameters) is built and run once only, in its own test.
LIGHT_MODELS = tuple(n for n in CIFAR_MODELS if n != "cifar_wrn_28_10")

NUM_FEATURES = {
    "cifar_resnet20": 64,
    "cifar_resnet32": 64,
    "cifar_resnet56": 64,
    "cifar_resnet110": 64,
    "cifar_wrn_16_1": 64,
    "cifar_wrn_16_2": 128,
    "cifar_wrn_40_1": 64,
    "cifar_wrn_40_2": 128,
    "cifar_wrn_28_10": 640,
}

# Parameter counts the papers (CIFAR-10 heads) report, in millions.
LITERATURE_PARAMS_M = {
    "cifar_resnet20": 0.27,  # He et al. 2016, Table 6
    "cifar_resnet56": 0.85,
    "cifar_wrn_16_2": 0.69,  # Zagoruyko & Komodakis 2016
    "cifar_wrn_40_2": 2.2,
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These batches are tiny; one thread is as fast and does not collapse on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exports() -> None:
    assert set(models.__all__) >= {"CifarResNet", "CifarWideResNet", "CIFAR_MODELS"}
    assert isinstance(CIFAR_MODELS, tuple) and len(CIFAR_MODELS) == 9
    assert set(CIFAR_MODELS) == set(NUM_FEATURES)


def test_every_name_is_listed_by_timm() -> None:
    listed = set(timm.list_models("cifar_*"))
    assert set(CIFAR_MODELS) <= listed
    for name in CIFAR_MODELS:
        assert timm.models.model_entrypoint(name).__module__.startswith("mutualkd.models.")


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_create_forward_shapes_and_head(name: str, in_chans: int) -> None:
    model = timm.create_model(name, num_classes=7, in_chans=in_chans).eval()
    assert model.num_classes == 7
    assert model.num_features == NUM_FEATURES[name]
    assert model.get_classifier() is model.fc
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert out.shape == (2, 7)
        assert feats.shape == (2, model.num_features, 8, 8)
        torch.testing.assert_close(model.forward_head(feats), out)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model.num_classes == 5
        assert model(x).shape == (2, 5)


def test_wrn_feature_map_is_post_activation() -> None:
    model = timm.create_model("cifar_wrn_16_1").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.min() >= 0


def test_pretrained_cfg() -> None:
    model = timm.create_model("cifar_resnet20")
    for cfg in (model.pretrained_cfg, model.default_cfg):
        assert cfg["input_size"] == (3, 32, 32)
        assert cfg["num_classes"] == 10
        assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
        assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    assert model.num_classes == 10
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32)
    assert data_cfg["crop_pct"] == 1.0

    model = timm.create_model("cifar_wrn_16_2.cifar100")
    assert model.num_classes == 100
    assert model.pretrained_cfg["mean"] == pytest.approx((0.5071, 0.4865, 0.4409))


@pytest.mark.parametrize("name", sorted(LITERATURE_PARAMS_M))
def test_parameter_counts_match_literature(name: str) -> None:
    params = _num_params(timm.create_model(name, num_classes=10))
    assert params / 1e6 == pytest.approx(LITERATURE_PARAMS_M[name], rel=0.03)


def test_wrn_28_10_params_and_one_tiny_forward() -> None:
    model = timm.create_model("cifar_wrn_28_10", num_classes=10).eval()
    assert _num_params(model) / 1e6 == pytest.approx(36.5, rel=0.03)
    assert model.num_features == 640
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_weight_init() -> None:
    model = timm.create_model("cifar_resnet20", num_classes=7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_chs * 3 * 3))
    w = model.layer3[1].conv1.weight
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


def test_training_step_with_dropout_and_drop_path() -> None:
    model = timm.create_model("cifar_wrn_16_1", num_classes=7, drop_rate=0.3, drop_path_rate=0.1)
    assert isinstance(model.layer1[0].drop, torch.nn.Dropout)
    model.train()
    model.set_grad_checkpointing(True)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert model.conv1.weight.grad is not None

    model = timm.create_model("cifar_resnet20", num_classes=7, drop_rate=0.2, drop_path_rate=0.1).train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_num_classes_zero_returns_pooled_features() -> None:
    model = timm.create_model("cifar_resnet20", num_classes=0).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_wrn_16_2"])
def test_features_only(name: str) -> None:
    full = timm.create_model(name).eval()
    feats = timm.create_model(name, features_only=True).eval()
    feats.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = feats(x)
        assert [m.shape[-1] for m in maps] == [32, 32, 16, 8]
        assert feats.feature_info.channels()[-1] == full.num_features
        torch.testing.assert_close(maps[-1], full.forward_features(x))


def test_pretrained_true_raises_clear_error() -> None:
    with pytest.raises(NoPretrainedWeightsError) as info:
        timm.create_model("cifar_wrn_16_2", pretrained=True)
    assert str(info.value) == (
        "no pretrained weights are published for cifar_wrn_16_2; "
        "train it with mutualkd or load a checkpoint"
    )
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, UserError)


def test_pretrained_from_a_local_file(tmp_path: Path) -> None:
    source = timm.create_model("cifar_resnet20")
    path = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        "cifar_resnet20", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=7
    )
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 7


def test_refuses_to_overwrite_a_timm_model() -> None:
    original = timm.models.model_entrypoint("resnet18")

    def resnet18(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        raise AssertionError("must never be registered")

    with pytest.raises(RuntimeError, match=r"'resnet18'.*timm\.models\.resnet"):
        register_cifar_model(resnet18)
    assert timm.models.model_entrypoint("resnet18") is original


def test_refuses_to_overwrite_a_cifar_model_from_another_module() -> None:
    def cifar_resnet20(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        raise AssertionError("must never be registered")

    with pytest.raises(RuntimeError, match=r"'cifar_resnet20'.*mutualkd\.models\.cifar_resnet"):
        register_cifar_model(cifar_resnet20)


def test_reload_is_idempotent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even timm's "Overwriting ..." warning
        for module in (models.cifar_resnet, models.cifar_wrn, models):
            importlib.reload(module)
    assert len([n for n in timm.list_models("cifar_*") if n in CIFAR_MODELS]) == len(CIFAR_MODELS)
    model = timm.create_model("cifar_resnet20", num_classes=3)
    assert type(model) is models.cifar_resnet.CifarResNet  # the reloaded class
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)

"""Optimizers: mutualkd's sgd / adamw keep their exact meaning; any other name is timm.optim's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import mutualkd.models  # noqa: F401  (the cifar_* families)
from mutualkd.config import OptimizerConfig, SchedulerConfig
from mutualkd.errors import RecipeError
from mutualkd.optim import build_optimizer, build_scheduler, check_optimizer, param_groups
from mutualkd.peers import PeerModule

#: The factory fixtures of tests/fixtures/ used here (make_trainer).
Factory = Callable[..., Any]


def _peer(name: str = "cifar_resnet20", **kw) -> PeerModule:
    torch.manual_seed(0)
    return PeerModule(timm.create_model(name, num_classes=10, **kw), name)


def test_sgd_is_torch_sgd_with_the_recipes_momentum_and_nesterov():
    peer = _peer()
    opt = build_optimizer([peer], OptimizerConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=False, weight_decay=1e-4))
    assert type(opt) is torch.optim.SGD
    (g,) = opt.param_groups
    assert (g["momentum"], g["nesterov"], g["weight_decay"], g["lr"]) == (0.8, False, 1e-4, 0.1)
    assert [id(p) for p in g["params"]] == [id(p) for p in peer.parameters()]  # one group, module order


def test_sgd_steps_exactly_as_the_plain_torch_optimizer():
    a, b = _peer(), _peer()
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_a = build_optimizer([a], cfg)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x)[1].square().mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_adamw_is_torch_adamw():
    opt = build_optimizer([_peer()], OptimizerConfig(name="adamw", lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05))
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("name, cls", [("lamb", "Lamb"), ("lars", "Lars"), ("lion", "Lion"), ("nesterov", "SGD")])
def test_other_names_are_timms(name: str, cls: str):
    opt = build_optimizer([_peer()], OptimizerConfig(name=name, lr=0.01, weight_decay=0.01))
    assert type(opt).__name__ == cls


def test_timms_nesterov_is_not_mutualkds_sgd():
    opt = build_optimizer([_peer()], OptimizerConfig(name="momentum", lr=0.01, nesterov=True))
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["nesterov"] is False  # timm's name decides


def test_no_weight_decay_of_a_vit_is_respected():
    vit = _peer("vit_tiny_patch16_224", img_size=32, patch_size=8)
    groups = param_groups([vit], OptimizerConfig(name="adamw", weight_decay=0.05, no_decay_1d=True))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    pos = vit.model.pos_embed
    assert pos.ndim == 3 and id(pos) in no_decay  # not 1-D, exempt by the model's no_weight_decay()
    assert id(vit.model.cls_token) in no_decay
    assert id(vit.model.patch_embed.proj.weight) not in no_decay
    # without no_decay_1d every parameter decays (the papers' setting)
    groups = param_groups([vit], OptimizerConfig(name="adamw", weight_decay=0.05))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05


def test_layer_decay_scales_the_lr_and_the_schedule_keeps_the_scale():
    vit = _peer("vit_tiny_patch16_224", img_size=32, patch_size=8)
    cfg = OptimizerConfig(name="adamw", lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    opt = build_optimizer([vit], cfg)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] < 1e-5  # 0.5 ** 14 layers down
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), total_epochs=2, steps_per_epoch=2)
    before = [g["lr"] for g in opt.param_groups]
    opt.step()
    sched.step()
    after = [g["lr"] for g in opt.param_groups]
    ratios = {round(b / a, 9) for a, b in zip(before, after)}
    assert len(ratios) == 1  # one schedule factor for every layer


def test_unknown_names_list_close_matches():
    with pytest.raises(RecipeError) as e:
        check_optimizer(OptimizerConfig(name="lamd"), file="r.toml", field="peers[1].optimizer")
    text = str(e.value)
    assert "unknown optimizer 'lamd'" in text and "'lamb'" in text and "peers[1].optimizer.name" in text


def test_args_are_for_timm_optimizers_only():
    with pytest.raises(RecipeError, match="takes no args"):
        check_optimizer(OptimizerConfig(name="sgd", args={"trust_coeff": 0.01}))
    opt = build_optimizer([_peer()], OptimizerConfig(name="lars", lr=0.1, args={"trust_coeff": 0.01}))
    assert opt.param_groups[0]["trust_coeff"] == 0.01


def test_a_run_trains_with_a_timm_optimizer(tmp_path: Path, make_trainer: Factory):
    t = make_trainer(tmp_path, name="lamb", max_steps=2, optimizer={"name": "lamb", "lr": 0.01})
    assert all(type(u.optimizer).__name__ == "Lamb" for u in t.units.values())
    t.fit()

"""Tests of the factor autoencoder and the inheritance / exploration encoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from mutualkd_builtins.factor import (
    FactorDecoder,
    FactorEncoder,
    InheritExploreEncoders,
    Paraphraser,
    factor_channels,
    inheritance_channels,
    reconstruction_loss,
)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _feature(c: int = 16, bsz: int = 4, hw: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(bsz, c, hw, hw, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# factor_channels


def test_factor_channels() -> None:
    assert factor_channels(16) == 8
    assert factor_channels(16, rate=0.25) == 4
    # halves round to even, as the Factor Transfer code's int(round(C * rate))
    assert factor_channels(5, rate=0.5) == 2
    assert factor_channels(7, rate=0.5) == 4
    assert factor_channels(3, rate=0.5) == 2
    assert factor_channels(1, rate=0.1) == 1  # at least one channel
    assert factor_channels(512, fixed=32) == 32
    for bad in (dict(in_channels=0), dict(in_channels=4, rate=0.0), dict(in_channels=4, fixed=0)):
        with pytest.raises(ValueError):
            factor_channels(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("input_act", [True, False])
def test_encoder_structure(input_act: bool) -> None:
    enc = FactorEncoder(16, 8, input_act=input_act)
    convs = _convs(enc)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 16), (16, 8), (8, 8)]
    changes = [i for i, c in enumerate(convs) if c.in_channels != c.out_channels]
    assert changes == [1]  # only the second conv changes the channel count
    for c in convs:
        assert c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
        assert c.bias is None
    layers = list(enc.body)
    assert len(layers) == 9
    for i in range(3):
        conv, bn, act = layers[3 * i : 3 * i + 3]
        assert isinstance(conv, nn.Conv2d)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == pytest.approx(0.1)
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert isinstance(enc.input_act, nn.LeakyReLU if input_act else nn.Identity)


def test_encoder_input_act_does_not_modify_input() -> None:
    f = _feature()
    f_copy = f.clone()
    FactorEncoder(16, 8)(f)
    assert torch.equal(f, f_copy)


def test_decoder_structure_mirror_is_the_default() -> None:
    dec = FactorDecoder(8, 16)
    assert dec.kind == "mirror" and Paraphraser(16).decoder.kind == "mirror"
    convs = _convs(dec)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 16), (16, 16)]
    assert all(c.bias is None for c in convs)
    assert isinstance(dec.input_act, nn.LeakyReLU) and dec.input_act.negative_slope == pytest.approx(0.1)
    layers = list(dec.body)
    assert len(layers) == 9  # three conv -> BN -> LeakyReLU blocks, the last one included
    for i in range(3):
        conv, bn, act = layers[3 * i : 3 * i + 3]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.LeakyReLU)
        assert bn.num_features == conv.out_channels and act.negative_slope == pytest.approx(0.1)


def test_decoder_structure_linear_out() -> None:
    dec = FactorDecoder(8, 16, kind="linear_out")
    convs = _convs(dec)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 16), (16, 16)]
    assert convs[0].bias is None and convs[1].bias is None
    assert convs[2].bias is not None  # plain last conv, can output any real value
    assert list(dec.body)[-1] is convs[2]  # no BN / activation after it
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dec.modules()) == 2
    assert isinstance(dec.input_act, nn.Identity)
    assert Paraphraser(16, decoder="linear_out").decoder.kind == "linear_out"
    with pytest.raises(ValueError, match="decoder"):
        FactorDecoder(8, 16, kind="transposed")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# shapes


def test_paraphraser_shapes_rate() -> None:
    para = Paraphraser(16, rate=0.5)
    assert para.factor_channels == 8
    f = _feature()
    factor, recon = para(f)
    assert factor.shape == (4, 8, 5, 5)
    assert recon.shape == f.shape
    assert torch.equal(para.encode(f), factor)  # train-mode BN: same batch, same statistics
    para.eval()
    factor_eval, _ = para(f)
    assert torch.allclose(para.encode(f), factor_eval)


def test_paraphraser_shapes_fixed() -> None:
    para = Paraphraser(16, fixed_channels=3)
    assert para.factor_channels == 3
    factor, recon = para(_feature())
    assert factor.shape == (4, 3, 5, 5) and recon.shape == (4, 16, 5, 5)


@pytest.mark.parametrize("split", ["natural", "random"])
@pytest.mark.parametrize("fixed", [None, 5])
def test_inherit_explore_shapes_match_teacher_factor(split: str, fixed: int | None) -> None:
    para = Paraphraser(16, rate=0.5, fixed_channels=fixed)
    student_feat = _feature(c=12, seed=1)  # the student may have another width
    ie = InheritExploreEncoders(12, para.factor_channels, split=split)  # type: ignore[arg-type]
    f_inh, f_exp = ie(student_feat)
    f_t = para.encode(_feature())
    assert f_inh.shape == f_exp.shape == f_t.shape
    assert len(ie.inh_index) == 6 and len(ie.exp_index) == 6
    assert _convs(ie.inh)[0].in_channels == 6 and _convs(ie.exp)[-1].out_channels == f_t.shape[1]


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match="16"):
        Paraphraser(16)(_feature(c=8))
    with pytest.raises(ValueError, match="16"):
        InheritExploreEncoders(16, 8)(_feature(c=8))


# --------------------------------------------------------------------------------------------
# reconstruction loss


def test_reconstruction_loss_values() -> None:
    f = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).view(1, 1, 2, 2)
    r = torch.tensor([[0.0, -1.0], [1.5, 1.0]]).view(1, 1, 2, 2)
    # differences 1, -1, -1, 3
    assert reconstruction_loss(f, r, "l1").item() == pytest.approx((1 + 1 + 1 + 3) / 4)
    assert reconstruction_loss(f, r, "l2").item() == pytest.approx((1 + 1 + 1 + 9) / 4)
    assert reconstruction_loss(f, r).item() == pytest.approx(1.5)  # default l1
    assert Paraphraser(1, rec_loss="l2").reconstruction_loss(f, r).item() == pytest.approx(3.0)
    assert Paraphraser(1).reconstruction_loss(f, r).item() == pytest.approx(1.5)


def test_reconstruction_loss_matches_manual_random() -> None:
    f, r = _feature(seed=2), _feature(seed=3)
    assert reconstruction_loss(f, r, "l1").item() == pytest.approx((f - r).abs().mean().item())
    assert reconstruction_loss(f, r, "l2").item() == pytest.approx(((f - r) ** 2).mean().item())
    assert torch.allclose(reconstruction_loss(f, r, "l2"), nn.functional.mse_loss(r, f))
    assert torch.allclose(reconstruction_loss(f, r, "l1"), nn.functional.l1_loss(r, f))
    low = reconstruction_loss(f.bfloat16(), r.bfloat16(), "l1")
    assert low.dtype == torch.float32


def test_reconstruction_loss_validation() -> None:
    with pytest.raises(ValueError):
        reconstruction_loss(_feature(), _feature(c=8), "l1")
    with pytest.raises(ValueError):
        reconstruction_loss(_feature(), _feature(), "huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Paraphraser(16, rec_loss="l3")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_paraphraser_training_reduces_reconstruction_loss(kind: str) -> None:
    torch.manual_seed(0)
    para = Paraphraser(16, rate=0.5, rec_loss=kind)  # type: ignore[arg-type]
    f = torch.relu(_feature(bsz=8, hw=4, seed=4))
    opt = torch.optim.SGD(para.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        _, recon = para(f)
        loss = para.reconstruction_loss(f, recon)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------------------------
# channel split


def test_natural_split_is_first_and_second_half() -> None:
    ie = InheritExploreEncoders(16, 8)
    assert ie.inh_index.dtype == torch.long and ie.exp_index.dtype == torch.long
    assert ie.inh_index.tolist() == list(range(8))
    assert ie.exp_index.tolist() == list(range(8, 16))
    f = _feature()
    f_inh, f_exp = ie.split_channels(f)
    assert torch.equal(f_inh, f[:, :8]) and torch.equal(f_exp, f[:, 8:])


def test_natural_split_ratio() -> None:
    ie = InheritExploreEncoders(10, 4, ratio=0.3)
    assert ie.inh_index.tolist() == [0, 1, 2]
    assert ie.exp_index.tolist() == list(range(3, 10))


def test_odd_channel_counts_give_the_extra_channel_to_exploration() -> None:
    ie = InheritExploreEncoders(7, 4)
    assert ie.inh_index.tolist() == [0, 1, 2] and ie.exp_index.tolist() == [3, 4, 5, 6]
    assert inheritance_channels(7) == 3 and inheritance_channels(8) == 4
    assert inheritance_channels(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in binary


@settings(max_examples=30, deadline=None)
@given(
    c=st.integers(2, 64),
    ratio=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_split_is_a_fixed_permutation(c: int, ratio: float, seed: int) -> None:
    n_inh = math.floor(ratio * c + 1e-9)  # the authors' int(C / 2) at ratio 0.5
    if n_inh < 1 or n_inh > c - 1:
        with pytest.raises(ValueError):
            InheritExploreEncoders(c, 1, split="random", ratio=ratio, generator_seed=seed)
        return
    ie = InheritExploreEncoders(c, 1, split="random", ratio=ratio, generator_seed=seed)
    inh, exp = ie.inh_index.tolist(), ie.exp_index.tolist()
    assert len(inh) == n_inh and len(exp) == c - n_inh
    assert not set(inh) & set(exp)
    assert sorted(inh + exp) == list(range(c))
    again = InheritExploreEncoders(c, 1, split="random", ratio=ratio, generator_seed=seed)
    assert torch.equal(again.inh_index, ie.inh_index)
    assert torch.equal(again.exp_index, ie.exp_index)


def test_random_split_depends_on_seed_and_is_not_natural() -> None:
    a = InheritExploreEncoders(32, 4, split="random", generator_seed=0)
    b = InheritExploreEncoders(32, 4, split="random", generator_seed=1)
    assert not torch.equal(a.inh_index, b.inh_index)
    assert a.inh_index.tolist() != list(range(16))


def test_split_survives_state_dict_round_trip() -> None:
    src = InheritExploreEncoders(16, 8, split="random", generator_seed=123)
    state = src.state_dict()
    assert "inh_index" in state and "exp_index" in state
    dst = InheritExploreEncoders(16, 8, split="random", generator_seed=7)
    assert not torch.equal(dst.inh_index, src.inh_index)
    dst.load_state_dict(state)
    assert torch.equal(dst.inh_index, src.inh_index)
    assert torch.equal(dst.exp_index, src.exp_index)
    src.eval()
    dst.eval()
    f = _feature(seed=9)
    for x, y in zip(src(f), dst(f)):
        assert torch.equal(x, y)
    # a natural-split module takes over the saved random split as well
    nat = InheritExploreEncoders(16, 8, split="natural")
    nat.load_state_dict(state)
    assert torch.equal(nat.inh_index, src.inh_index)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_invalid_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        InheritExploreEncoders(16, 8, ratio=ratio)


def test_split_with_an_empty_part_raises() -> None:
    with pytest.raises(ValueError, match="at least 1 channel"):
        InheritExploreEncoders(4, 2, ratio=0.05)
    with pytest.raises(ValueError, match="at least 1 channel"):
        InheritExploreEncoders(1, 2)
    with pytest.raises(ValueError):
        InheritExploreEncoders(16, 8, split="sorted")  # type: ignore[arg-type]


def test_gradients_reach_both_encoders_and_the_features() -> None:
    ie = InheritExploreEncoders(16, 8, split="random", generator_seed=3)
    f = _feature().requires_grad_(True)
    f_inh, f_exp = ie(f)
    (f_inh.sum() + f_exp.pow(2).sum()).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    assert all(p.grad is not None for p in ie.parameters())

"""mutualkd's IE components against the published formulas, each written here independently.

Every reference below is written from a formula (the IE-KD authors' released code read as
equations, Factor Transfer's, Kornblith et al.'s and Song et al.'s), with plain tensor
operations, never by calling the implementation's helpers. Each ``measure_*`` function
returns the largest absolute difference between mutualkd and its reference; the tests bound
it, and ``python tests/test_reference_forms.py`` prints the figures that docs/methods.md's
table quotes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mutualkd_builtins.factor import FactorDecoder, FactorEncoder, InheritExploreEncoders, Paraphraser, factor_channels
from mutualkd_builtins.metrics import (
    cka_debiased_distance,
    cka_distance,
    l1_distance,
    l2_distance,
    l2_per_sample_distance,
    orthogonal_distance,
)
from mutualkd_builtins.strategies._ie import cka_range_note, null_cka
from mutualkd_builtins.strategies.ie_dml import IEDMLParams
from mutualkd_builtins.strategies.ie_kd import IEKDParams

SLOPE = 0.1  # LeakyReLU slope of the authors' code
BN_EPS = 1e-5  # torch's BatchNorm2d default, used by the authors' nn.BatchNorm2d


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the authors' Coder
def leaky(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x, SLOPE * x)


def batch_norm_train(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """BN with the batch's statistics: (x - mean) / sqrt(biased var + eps) * gamma + beta."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + BN_EPS) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def conv3x3(x: Tensor, w: Tensor) -> Tensor:
    """3x3 convolution, stride 1, zero padding 1, no bias, as an explicit sum over the 9 taps."""
    b, _, h, wd = x.shape
    xp = torch.zeros(b, x.shape[1], h + 2, wd + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(b, w.shape[0], h, wd, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            out += torch.einsum("bchw,oc->bohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    return out


def ref_coder(x: Tensor, layers: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The authors' Coder: LReLU, then (conv, BN, LReLU) three times (training-mode BN)."""
    out = leaky(x)
    for w, gamma, beta in layers:
        out = leaky(batch_norm_train(conv3x3(out, w), gamma, beta))
    return out


def coder_weights(module: nn.Module) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(conv weight, BN weight, BN bias) of each block, in order: the weights copied over."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 3
    return [(c.weight.detach().double(), b.weight.detach().double(), b.bias.detach().double()) for c, b in zip(convs, bns)]


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN affine parameters, so that the comparison also covers them."""
    g = _gen(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module.double().train()


def measure_encoder() -> float:
    enc = _perturbed(FactorEncoder(7, 4), 1)
    x = torch.randn(6, 7, 5, 5, generator=_gen(2), dtype=torch.float64)
    return (enc(x) - ref_coder(x, coder_weights(enc))).abs().max().item()


def measure_decoder() -> float:
    dec = _perturbed(FactorDecoder(4, 7), 3)
    z = torch.randn(6, 4, 5, 5, generator=_gen(4), dtype=torch.float64)
    return (dec(z) - ref_coder(z, coder_weights(dec))).abs().max().item()


def measure_linear_out_decoder() -> float:
    """The option ``decoder = "linear_out"`` against the authors' decoder with the same weights."""
    dec = _perturbed(FactorDecoder(4, 7, kind="linear_out"), 3)
    convs = [m for m in dec.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in dec.modules() if isinstance(m, nn.BatchNorm2d)]
    last_bn = (torch.ones(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64))
    layers = [(c.weight.detach(), b.weight.detach(), b.bias.detach()) for c, b in zip(convs, bns)]
    layers.append((convs[2].weight.detach(), *last_bn))
    with torch.no_grad():
        convs[2].bias.copy_(0.1 * torch.randn(7, generator=_gen(5)))
    z = torch.randn(6, 4, 5, 5, generator=_gen(4), dtype=torch.float64)
    return (dec(z) - ref_coder(z, layers)).abs().max().item()


def measure_paraphraser() -> float:
    """Encoder + decoder and the authors' RecLoss (norm 1: sum |f - R(f)| / numel)."""
    para = _perturbed(Paraphraser(7, rate=0.5), 6)
    f = torch.relu(torch.randn(6, 7, 5, 5, generator=_gen(7), dtype=torch.float64))
    factor, recon = para(f)
    ref_factor = ref_coder(f, coder_weights(para.encoder))
    ref_recon = ref_coder(ref_factor, coder_weights(para.decoder))
    ref_rec = (f - ref_recon).abs().sum() / f.numel()
    return max((factor - ref_factor).abs().max().item(), (recon - ref_recon).abs().max().item(),
               abs(para.reconstruction_loss(f, recon).item() - ref_rec.item()))


def measure_student_encoders() -> float:
    """The authors' split (natural: index[:int(C/2)] / index[int(C/2):]) and one Coder per part."""
    c = 7
    ie = InheritExploreEncoders(c, 4)
    ie.inh, ie.exp = _perturbed(ie.inh, 8), _perturbed(ie.exp, 9)
    f = torch.randn(6, c, 5, 5, generator=_gen(10), dtype=torch.float64)
    index = torch.arange(c)
    f_inh, f_exp = f[:, index[: int(c / 2)]], f[:, index[int(c / 2) :]]
    got_inh, got_exp = ie(f)
    return max((got_inh - ref_coder(f_inh, coder_weights(ie.inh))).abs().max().item(),
               (got_exp - ref_coder(f_exp, coder_weights(ie.exp))).abs().max().item())


# --------------------------------------------------------------------------- the authors' losses
def _pair(seed: int, shape: tuple[int, ...] = (8, 32, 4, 4)) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _normalised(x: Tensor) -> Tensor:
    rows = x.reshape(x.shape[0], -1)
    return rows / rows.pow(2).sum(dim=1, keepdim=True).sqrt()


def norm_loss(a: Tensor, b: Tensor, p: int) -> Tensor:
    """The authors' NormLoss(p): (||a^ - b^||_p^p / numel)^(1/p), a^ the per-sample unit vectors."""
    diff = _normalised(a) - _normalised(b)
    return (diff.abs().pow(p).sum() / diff.numel()).pow(1.0 / p)


def cos_loss_negative(a: Tensor, b: Tensor) -> Tensor:
    """The authors' CosLoss(negative=True): mean over samples of |<a^_i, b^_i>|."""
    return (_normalised(a) * _normalised(b)).sum(dim=1).abs().mean()


def measure_l1() -> float:
    return max(abs(l1_distance(a, b).item() - norm_loss(a, b, 1).item()) for a, b in (_pair(s) for s in range(5)))


def measure_l2() -> float:
    return max(abs(l2_distance(a, b).item() - norm_loss(a, b, 2).item()) for a, b in (_pair(s) for s in range(5)))


def measure_orthogonal() -> float:
    """Value and gradient of the exploration term: -lambda d = lambda (mean |cos| - 1)."""
    worst = 0.0
    for s in range(5):
        a, b = _pair(s)
        x = a.clone().requires_grad_(True)
        ours = -50.0 * orthogonal_distance(x, b)
        ours.backward()
        g_ours = x.grad.clone()
        x.grad = None
        theirs = 50.0 * cos_loss_negative(x, b) - 50.0
        theirs.backward()
        worst = max(worst, abs(ours.item() - theirs.item()), (g_ours - x.grad).abs().max().item())
    return worst


# --------------------------------------------------------------------------- CKA
def _centring(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, eq. with the centring matrix H: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    h = _centring(x.shape[0])
    k, l = x @ x.T, y @ y.T
    hsic = lambda p, q: float(np.trace(p @ h @ q @ h))  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def song_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012, eq. (5): [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return song_unbiased_hsic(k, l) / math.sqrt(song_unbiased_hsic(k, k) * song_unbiased_hsic(l, l))


def _related(seed: int, n: int = 24, p: int = 40) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, p, generator=g, dtype=torch.float64) + 2.0 * torch.randn(n, p, generator=g, dtype=torch.float64)
    return x, y


def measure_cka() -> float:
    return max(abs((1 - cka_distance(x, y).item()) - ref_linear_cka(x.numpy(), y.numpy()))
               for x, y in (_related(s) for s in range(5)))


def measure_cka_debiased() -> float:
    return max(abs((1 - cka_debiased_distance(x, y).item()) - ref_debiased_cka(x.numpy(), y.numpy()))
               for x, y in (_related(s) for s in range(5)))


# --------------------------------------------------------------------------- channel counts, init
def measure_channel_counts() -> float:
    """Factor Transfer's int(round(C * rate)) and IE-KD's int(C / 2), for C = 2 .. 512: mismatches."""
    bad = 0
    for c in range(2, 513):
        bad += factor_channels(c, rate=0.5) != max(1, int(round(c * 0.5)))
        bad += factor_channels(c, rate=0.25) != max(1, int(round(c * 0.25)))
        bad += InheritExploreEncoders(c, 1).inh_index.numel() != int(c / 2)
    return float(bad)


def measure_init() -> float:
    """Relative error of the conv weights' std against the authors' sqrt(2 / (3 * 3 * out_channels))."""
    torch.manual_seed(0)
    enc = FactorEncoder(256, 128)
    worst = 0.0
    for conv in (m for m in enc.modules() if isinstance(m, nn.Conv2d)):
        target = math.sqrt(2.0 / (9 * conv.out_channels))
        worst = max(worst, abs(conv.weight.std().item() / target - 1))
    return worst


AGREEMENT: dict[str, Callable[[], float]] = {
    "factor encoder": measure_encoder,
    "decoder (mirror, default)": measure_decoder,
    "decoder (linear_out option)": measure_linear_out_decoder,
    "paraphraser and L1 reconstruction loss": measure_paraphraser,
    "student inheritance/exploration encoders": measure_student_encoders,
    "l1 metric": measure_l1,
    "l2 metric": measure_l2,
    "orthogonal metric (value and gradient)": measure_orthogonal,
    "cka (biased)": measure_cka,
    "cka_debiased": measure_cka_debiased,
    "channel counts (mismatches)": measure_channel_counts,
    "conv init (relative std error)": measure_init,
}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "name,tol",
    [
        ("factor encoder", 1e-12),
        ("decoder (mirror, default)", 1e-12),
        ("paraphraser and L1 reconstruction loss", 1e-12),
        ("student inheritance/exploration encoders", 1e-12),
        ("l1 metric", 1e-15),
        ("l2 metric", 1e-15),
        ("orthogonal metric (value and gradient)", 1e-12),
        ("cka (biased)", 1e-13),
        ("cka_debiased", 1e-13),
        ("channel counts (mismatches)", 0.0),
    ],
)
def test_matches_the_authors_form(name: str, tol: float) -> None:
    assert AGREEMENT[name]() <= tol


def test_linear_out_decoder_is_not_the_authors_form() -> None:
    # The kept option differs on purpose: no leading activation, a linear biased last layer.
    assert measure_linear_out_decoder() > 0.1


def test_init_is_the_authors() -> None:
    # 294912 weights in the first conv: the std's relative standard error is about 0.13 %;
    # the previous leaky-ReLU gain was 0.5 % lower.
    assert measure_init() < 0.004


def test_l2_differs_from_the_per_sample_form_by_sqrt_n() -> None:
    # Unrelated factors: every per-sample distance is close to sqrt(2), so the ratio of the
    # per-sample mean to the authors' root mean square is close to sqrt(N) (x22.6 for 32x4x4).
    a, b = _pair(0)
    ratio = l2_per_sample_distance(a, b).item() / norm_loss(a, b, 2).item()
    assert ratio == pytest.approx(math.sqrt(32 * 4 * 4), rel=0.01)


def test_ie_kd_autoencoder_optimizer_is_the_authors_nesterov_sgd(tmp_path: Path) -> None:
    """The optimizer the engine builds for the teacher's autoencoder by default steps as
    SGD with Nesterov momentum 0.9, lr 0.1, weight decay 5e-4 on every parameter:
    g = grad + wd p; v = mu v + g; p = p - lr (g + mu v)."""
    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer
    from mutualkd.testing import make_teacher

    assert IEKDParams(teacher="t").ae_optimizer.nesterov is True
    teacher = make_teacher(tmp_path / "t", steps=1)
    recipe = parse_recipe({
        "run": {"name": "kd", "out_dir": str(tmp_path), "progress": False, "device": "cpu", "max_steps": 1},
        "data": {"dataset": "digits", "batch_size": 8, "train_subset": 32, "test_subset": 20},
        "peers": [{"model": "cifar_wrn_16_1"}],
        "strategy": {"name": "ie_kd", "teacher": str(teacher)},
    }, file="<test>")
    opt = Trainer(recipe, recipe_file="<test>").units["teacher.ae"].optimizer
    assert opt is not None
    params = [p for group in opt.param_groups for p in group["params"]]
    start = [p.detach().clone() for p in params]
    lr, mu, wd = 0.1, 0.9, 5e-4
    velocity = [torch.zeros_like(p) for p in params]
    expected = [p.clone() for p in start]
    g = _gen(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            d = grad + wd * expected[i]
            velocity[i] = mu * velocity[i] + d
            expected[i] = expected[i] - lr * (d + mu * velocity[i])
    worst = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected))
    assert worst < 1e-6


def test_null_cka_formula_matches_simulation() -> None:
    g = _gen(3)
    for bsz, p in ((16, 2048), (64, 256), (256, 64)):
        sims = [1 - cka_distance(torch.randn(bsz, p, generator=g, dtype=torch.float64),
                                 torch.randn(bsz, p, generator=g, dtype=torch.float64)).item() for _ in range(6)]
        assert np.mean(sims) == pytest.approx(null_cka(bsz, p), abs=0.02)


def test_cka_range_note() -> None:
    cka_exp = IEDMLParams(exp_metric="cka")
    note = cka_range_note(cka_exp, 16, [2048, 512])
    assert note is not None and "strategy.exp_metric" in note and "0.99" in note and "cka_debiased" in note
    assert cka_range_note(cka_exp, 8192, [2048]) is None  # p / (p + B) = 0.2
    assert cka_range_note(IEDMLParams(), 16, [2048]) is None  # l1: nothing to say
    both = cka_range_note(IEDMLParams(inh_metric="cka", exp_metric="cka"), 16, [2048])
    assert both is not None and "strategy.inh_metric and strategy.exp_metric" in both
    small = cka_range_note(IEDMLParams(exp_metric="cka_debiased"), 2, [2048])
    assert small is not None and "at least 4" in small
    assert cka_range_note(IEDMLParams(exp_metric="cka_debiased"), 16, [2048]) is None


@pytest.mark.parametrize("metric,batch,warned", [("cka", 16, True), ("l1", 16, False), ("cka", 1024, False)])
def test_cka_warning_once_at_set_up(metric: str, batch: int, warned: bool, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """WRN-16-1 on 8x8 digits: 64 x 2 x 2 feature maps, factors of 32 x 2 x 2 = 128 values."""
    from mutualkd.config import parse_recipe
    from mutualkd.engine import check_recipe

    recipe = parse_recipe({
        "run": {"name": "w", "out_dir": str(tmp_path), "device": "cpu"},
        "data": {"dataset": "digits", "batch_size": batch},
        "peers": [{"model": "cifar_wrn_16_1"}, {"model": "cifar_wrn_16_1"}],
        "strategy": {"name": "ie_dml", "exp_metric": metric},
    }, file="w.toml")
    check_recipe(recipe, recipe_file="w.toml")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("mutualkd") and r.levelname == "WARNING"]
    assert len(warnings) == (1 if warned else 0), warnings
    out = " ".join(warnings)
    if warned:
        assert "w.toml" in out and "batch size 16" in out and "128 values" in out and "0.89" in out


if __name__ == "__main__":
    for label, fn in AGREEMENT.items():
        print(f"{label}: {fn():.3g}")

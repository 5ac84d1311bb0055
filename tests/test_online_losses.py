"""The online-distillation losses (ONE, CL-ILR, OKDDip, PCL, KDCL, FFL, MCL, SwitOKD) against their formulas.

Every reference below is written here from the formula in float64 (numpy, or plain float64 tensor
operations for the modules), with loops over samples and classes, never by calling the function
under test or ``F.kl_div``. The implementations compute in float32, hence the tolerances. Further
tests check the detach points: which inputs each term sends gradient into.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from mutualkd_builtins.losses import kd_div, sigmoid_rampup
from mutualkd.branching import scale_gradient
from mutualkd_builtins.strategies.cl_ilr import cl_terms
from mutualkd_builtins.strategies.ffl import FusionModule, ffl_terms
from mutualkd_builtins.strategies.kdcl import kdcl_teacher, kdcl_terms
from mutualkd_builtins.strategies.mcl import ProjectionHead, mcl_terms, supcon
from mutualkd_builtins.strategies.okddip import PeerAttention, okddip_terms
from mutualkd_builtins.strategies.one import OneGate, gated_ensemble, one_terms
from mutualkd_builtins.strategies.pcl import PeerEnsembleHead, pcl_decay, pcl_terms
from mutualkd_builtins.strategies.switokd import switch_statistics, switokd_terms

B, C = 6, 5  # batch, classes
EPS = 1e-7  # KD_T^eps of ONE, OKDDip, FFL
BN_EPS = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int, n: int = 1, shape: tuple[int, ...] = (B, C), scale: float = 2.0) -> list[Tensor]:
    g = _gen(seed)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_() for _ in range(n)]


def _labels(seed: int, n: int = B, classes: int = C) -> Tensor:
    return torch.randint(0, classes, (n,), generator=_gen(seed))


def _np(x: Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def close(actual: Tensor, expected: float | np.ndarray | Tensor, atol: float = 1e-5) -> None:
    expected_t = expected if isinstance(expected, Tensor) else torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual.detach().double(), expected_t.double(), rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- float64 references
def ref_log_softmax(row: np.ndarray) -> np.ndarray:
    m = max(row)
    total = sum(math.exp(v - m) for v in row)
    return np.array([v - m - math.log(total) for v in row])


def ref_kd(z_s: np.ndarray, z_t: np.ndarray, t: float, eps: float = 0.0) -> float:
    """T^2 (1/B) sum_b sum_c q_bc (log q_bc - log p_bc), q = softmax(z_t / T) + eps, p = softmax(z_s / T)."""
    total = 0.0
    for b in range(z_s.shape[0]):
        log_p = ref_log_softmax(z_s[b] / t)
        q = np.exp(ref_log_softmax(z_t[b] / t)) + eps
        for c in range(z_s.shape[1]):
            total += q[c] * (math.log(q[c]) - log_p[c])
    return t * t * total / z_s.shape[0]


def ref_ce_per_sample(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(z_b)[y_b]; for soft labels y [B, C]: -sum_c y_bc log softmax(z_b)_c."""
    out = np.zeros(z.shape[0])
    for b in range(z.shape[0]):
        log_p = ref_log_softmax(z[b])
        if y.ndim == 2:
            out[b] = -sum(y[b, c] * log_p[c] for c in range(z.shape[1]))
        else:
            out[b] = -log_p[int(y[b])]
    return out


def ref_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(ref_ce_per_sample(z, y).mean())


def ref_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Training-mode BN: batch mean, biased variance, eps 1e-5, per channel (dim 1)."""
    shape = [1] * x.dim()
    shape[1] = -1
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + BN_EPS) * gamma.view(shape) + beta.view(shape)


# --------------------------------------------------------------------------- shared losses
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, EPS, 0.05])
def test_kd_div_matches_reference(temperature: float, eps: float) -> None:
    z_s, z_t = _logits(0, 2)
    close(kd_div(z_s, z_t, temperature, eps=eps), ref_kd(_np(z_s), _np(z_t), temperature, eps))


def test_kd_div_is_float32_and_does_not_detach_the_target() -> None:
    z_s, z_t = (z.detach().to(torch.bfloat16).requires_grad_() for z in _logits(1, 2))
    out = kd_div(z_s, z_t, 3.0, eps=EPS)
    assert out.dtype == torch.float32
    out.backward()
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0


def test_sigmoid_rampup() -> None:
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(0, 80) == pytest.approx(0.0067, abs=1e-4)
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-5.0 * 0.25))
    assert sigmoid_rampup(80, 80) == 1.0
    assert sigmoid_rampup(300, 80) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    values = [sigmoid_rampup(e, 10) for e in range(12)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="ramp length"):
        sigmoid_rampup(0, -1)


# --------------------------------------------------------------------------- ONE
def test_one_gate_matches_reference() -> None:
    torch.manual_seed(0)
    gate = OneGate(channels=4, branches=3).double()
    with torch.no_grad():
        gate.bn.weight.uniform_(0.5, 1.5)
        gate.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(B, 4, 3, 3, generator=_gen(1), dtype=torch.float64)
    w, bias = gate.fc.weight.detach(), gate.fc.bias.detach()
    pooled = torch.stack([torch.stack([x[b, c].sum() / 9 for c in range(4)]) for b in range(B)])
    h = torch.stack([torch.stack([(w[k] * pooled[b]).sum() + bias[k] for k in range(3)]) for b in range(B)])
    h = torch.clamp(ref_batch_norm(h, gate.bn.weight.detach(), gate.bn.bias.detach(), (0,)), min=0)
    expected = torch.exp(h) / torch.exp(h).sum(dim=1, keepdim=True)
    g = gate(x)
    close(g, expected)
    close(g.sum(dim=1), np.ones(B))


def test_one_terms_match_reference() -> None:
    branches = _logits(2, 3)
    gate = torch.softmax(torch.randn(B, 3, generator=_gen(3), dtype=torch.float64), dim=1)
    y = _labels(4)
    zs, g = [_np(z) for z in branches], _np(gate)
    z_e = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            z_e[b, c] = sum(g[b, i] * zs[i][b, c] for i in range(3))
    close(gated_ensemble(branches, gate), z_e)
    per_branch, ensemble = one_terms(branches, gate, y, weight=0.3)
    for i, terms in enumerate(per_branch):
        assert set(terms) == {"ce", "kd"}
        close(terms["ce"], ref_ce(zs[i], _np(y)))
        close(terms["kd"], 0.3 * ref_kd(zs[i], z_e, 3.0, EPS))
    assert set(ensemble) == {"ce"}
    close(ensemble["ce"], ref_ce(z_e, _np(y)))


def test_one_gate_learns_only_through_the_ensemble_ce() -> None:
    torch.manual_seed(0)
    gate_module = OneGate(channels=4, branches=3)
    trunk = torch.randn(B, 4, 3, 3, generator=_gen(5), requires_grad=True)
    branches = _logits(6, 3)
    y = _labels(7)
    gate = gate_module(trunk)
    per_branch, ensemble = one_terms(branches, gate, y, weight=1.0)

    # The distillation terms (and the branches' own CE) never reach the gate or the trunk.
    torch.stack([t["kd"] + t["ce"] for t in per_branch]).sum().backward()
    assert all(p.grad is None for p in gate_module.parameters())
    assert trunk.grad is None

    for z in branches:
        z.grad = None
    ensemble["ce"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_module.parameters())
    assert trunk.grad is not None and trunk.grad.abs().sum() > 0
    # Each branch gets CE(z_e)'s gradient scaled by its gate: g_i * (softmax(z_e) - onehot(y)) / B.
    g, zs = _np(gate), [_np(z) for z in branches]
    for i, z in enumerate(branches):
        expected = np.zeros((B, C))
        for b in range(B):
            p = np.exp(ref_log_softmax(np.array([sum(g[b, k] * zs[k][b, c] for k in range(3)) for c in range(C)])))
            for c in range(C):
                expected[b, c] = g[b, i] * (p[c] - (1.0 if c == int(y[b]) else 0.0)) / B
        close(z.grad, expected)


# --------------------------------------------------------------------------- CL-ILR
def test_cl_terms_match_reference() -> None:
    heads = _logits(10, 4)
    y = _labels(11)
    zs = [_np(z) for z in heads]
    terms = cl_terms(heads, y, temperature=2.0, alpha=0.5)
    for i, t in enumerate(terms):
        assert set(t) == {"ce", "kd"}
        target = np.zeros((B, C))
        for b in range(B):
            for c in range(C):
                target[b, c] = sum(zs[j][b, c] for j in range(4) if j != i) / 3
        close(t["ce"], 0.5 * ref_ce(zs[i], _np(y)))
        close(t["kd"], 0.5 * ref_kd(zs[i], target, 2.0))
    alpha_terms = cl_terms(heads, y, temperature=2.0, alpha=0.2)
    close(alpha_terms[0]["ce"], 0.8 * ref_ce(zs[0], _np(y)))


def test_cl_targets_are_detached() -> None:
    heads = _logits(12, 3)
    cl_terms(heads, _labels(13))[0]["kd"].backward()
    assert heads[0].grad is not None
    assert heads[1].grad is None and heads[2].grad is None


def test_scale_gradient_divides_the_shared_gradient_by_the_number_of_branches() -> None:
    x = torch.randn(4, 3, generator=_gen(14), dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(4, 3, generator=_gen(15 + k), dtype=torch.float64) for k in range(4)]
    shared = scale_gradient(x, 1.0 / len(weights))
    torch.testing.assert_close(shared, x, rtol=0, atol=0)
    torch.stack([(shared * w).sum() for w in weights]).sum().backward()
    expected = sum(_np(w) for w in weights) / len(weights)
    close(x.grad, expected, atol=1e-12)


# --------------------------------------------------------------------------- OKDDip
def test_peer_attention_matches_reference() -> None:
    torch.manual_seed(0)
    attention = PeerAttention(dim=16, reduction=8).double()
    assert attention.query.weight.shape == (2, 16) and attention.query.bias is None
    feats = [torch.randn(B, 16, generator=_gen(20 + i), dtype=torch.float64) for i in range(3)]
    w_q, w_k = _np(attention.query.weight), _np(attention.key.weight)
    expected = np.zeros((B, 3, 3))
    for b in range(B):
        q = [w_q @ _np(f[b]) for f in feats]
        k = [w_k @ _np(f[b]) for f in feats]
        for i in range(3):
            energy = [float(q[i] @ k[j]) for j in range(3)]
            expected[b, i] = np.exp(ref_log_softmax(np.array(energy)))
    close(attention(feats), expected)


def test_okddip_terms_match_reference() -> None:
    peers = _logits(25, 3)
    (leader,) = _logits(26)
    att = torch.softmax(torch.randn(B, 3, 3, generator=_gen(27), dtype=torch.float64), dim=-1)
    y = _labels(28)
    zs, a = [_np(z) for z in peers], _np(att)
    peer_terms, leader_terms = okddip_terms(peers, leader, att, y, weight=0.5)
    for i, t in enumerate(peer_terms):
        assert set(t) == {"ce", "kd"}
        target = np.zeros((B, C))
        for b in range(B):
            for c in range(C):
                target[b, c] = sum(a[b, i, j] * zs[j][b, c] for j in range(3))
        close(t["ce"], ref_ce(zs[i], _np(y)))
        close(t["kd"], 0.5 * ref_kd(zs[i], target, 3.0, EPS))
    mean = sum(zs) / 3
    assert set(leader_terms) == {"ce", "kd"}
    close(leader_terms["ce"], ref_ce(_np(leader), _np(y)))
    close(leader_terms["kd"], 0.5 * ref_kd(_np(leader), mean, 3.0, EPS))
    detached = okddip_terms(peers, leader, att, y, weight=0.5, detach_targets=True)
    close(detached[0][1]["kd"], peer_terms[1]["kd"])


def _okddip_graph(
    detach_targets: bool,
) -> tuple[PeerAttention, list[Tensor], Tensor, list[dict[str, Tensor]], dict[str, Tensor]]:
    torch.manual_seed(0)
    attention = PeerAttention(dim=16)
    feats = [torch.randn(B, 16, generator=_gen(30 + i)) for i in range(3)]
    peers = [f[:, :C].clone().requires_grad_() for f in feats]
    (leader,) = _logits(33)
    peer_terms, leader_terms = okddip_terms(peers, leader, attention(feats), _labels(34), weight=1.0,
                                            detach_targets=detach_targets)
    return attention, peers, leader, peer_terms, leader_terms


def test_okddip_attention_learns_through_its_targets_by_default() -> None:
    attention, peers, _, peer_terms, _ = _okddip_graph(detach_targets=False)
    peer_terms[0]["kd"].backward()
    assert attention.query.weight.grad is not None and attention.query.weight.grad.abs().sum() > 0
    assert attention.key.weight.grad is not None and attention.key.weight.grad.abs().sum() > 0
    assert peers[1].grad is not None and peers[1].grad.abs().sum() > 0  # into another peer's logits


def test_okddip_detached_targets_leave_the_attention_without_gradient() -> None:
    attention, peers, leader, peer_terms, leader_terms = _okddip_graph(detach_targets=True)
    peer_terms[0]["kd"].backward(retain_graph=True)
    assert peers[1].grad is None and peers[2].grad is None
    total = torch.stack([v for t in peer_terms for v in t.values()] + list(leader_terms.values())).sum()
    total.backward()
    assert attention.query.weight.grad is None and attention.key.weight.grad is None
    assert leader.grad is not None


# --------------------------------------------------------------------------- PCL
def test_peer_ensemble_head_matches_reference() -> None:
    torch.manual_seed(0)
    head = PeerEnsembleHead(dim=4, branches=3, num_classes=C).double()
    feats = [torch.randn(B, 4, generator=_gen(40 + i), dtype=torch.float64) for i in range(3)]
    w, bias = _np(head.fc.weight), _np(head.fc.bias)
    expected = np.zeros((B, C))
    for b in range(B):
        concat = [float(feats[i][b, d]) for i in range(3) for d in range(4)]
        for c in range(C):
            expected[b, c] = sum(w[c, k] * concat[k] for k in range(12)) + bias[c]
    close(head(feats), expected)


def test_pcl_decay_sequence() -> None:
    assert [pcl_decay(t) for t in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert pcl_decay(998) == pytest.approx(1 - 1 / 999)
    assert pcl_decay(999) == pytest.approx(0.999)
    assert pcl_decay(10**6) == 0.999
    assert pcl_decay(10**6, cap=0.99) == 0.99
    values = [pcl_decay(t) for t in range(2000)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="step count"):
        pcl_decay(-1)


def test_pcl_terms_match_reference() -> None:
    branches = _logits(45, 3)
    (ensemble,) = _logits(46)
    means = _logits(47, 3)
    y = _labels(48)
    zs, ms, z_en = [_np(z) for z in branches], [_np(m) for m in means], _np(ensemble)
    branch_terms, ensemble_terms = pcl_terms(branches, ensemble, means, y, weight=0.4)
    assert set(ensemble_terms) == {"ce"}
    close(ensemble_terms["ce"], ref_ce(z_en, _np(y)))
    for i, t in enumerate(branch_terms):
        assert set(t) == {"ce", "kd_ensemble", "kd_mean"}
        close(t["ce"], ref_ce(zs[i], _np(y)))
        close(t["kd_ensemble"], 0.4 * ref_kd(zs[i], z_en, 3.0))
        close(t["kd_mean"], 0.4 * sum(ref_kd(zs[i], ms[j], 3.0) for j in range(3) if j != i) / 2)


def test_pcl_teachers_are_detached() -> None:
    branches, (ensemble,), means = _logits(50, 3), _logits(51), _logits(52, 3)
    branch_terms, _ = pcl_terms(branches, ensemble, means, _labels(53), weight=1.0)
    torch.stack([t["kd_ensemble"] + t["kd_mean"] for t in branch_terms]).sum().backward()
    assert ensemble.grad is None and all(m.grad is None for m in means)
    assert all(z.grad is not None for z in branches)


# --------------------------------------------------------------------------- KDCL
def ref_kdcl_teacher(zs: Sequence[np.ndarray], y: np.ndarray, variant: str) -> np.ndarray:
    n = len(zs)
    out = np.zeros((B, C))
    ce = [ref_ce_per_sample(z, y) for z in zs]
    for b in range(B):
        best = min(range(n), key=lambda i: ce[i][b])
        for c in range(C):
            if variant == "mean":
                out[b, c] = sum(z[b, c] for z in zs) / n
            elif variant == "min_logit":
                out[b, c] = min(z[b, c] - z[b, int(y[b])] for z in zs)
            else:
                out[b, c] = zs[best][b, c]
    return out


@pytest.mark.parametrize("variant", ["mean", "min_logit", "best"])
def test_kdcl_matches_reference(variant: str) -> None:
    nets = _logits(60, 3)
    y = _labels(61)
    zs = [_np(z) for z in nets]
    teacher = ref_kdcl_teacher(zs, _np(y), variant)
    z_t = kdcl_teacher(nets, y, variant)
    assert not z_t.requires_grad
    close(z_t, teacher)
    for i, t in enumerate(kdcl_terms(nets, y, variant=variant)):
        assert set(t) == {"ce", "kd"}
        close(t["ce"], 0.5 * ref_ce(zs[i], _np(y)))
        close(t["kd"], 0.5 * ref_kd(zs[i], teacher, 4.0))


def test_kdcl_min_logit_teacher_is_at_least_as_good_as_every_network() -> None:
    nets = _logits(62, 4, shape=(32, 10))
    y = _labels(63, 32, 10)
    z_t = kdcl_teacher(nets, y, "min_logit")
    ce_t = ref_ce_per_sample(_np(z_t), _np(y))
    ce_min = np.min([ref_ce_per_sample(_np(z), _np(y)) for z in nets], axis=0)
    assert np.all(ce_t <= ce_min + 1e-6)
    close(z_t.gather(1, y[:, None]), np.zeros((32, 1)), atol=0)


def test_kdcl_soft_labels() -> None:
    nets = _logits(64, 3)
    soft = torch.softmax(torch.randn(B, C, generator=_gen(65), dtype=torch.float64), dim=1)
    zs = [_np(z) for z in nets]
    close(kdcl_teacher(nets, soft, "best"), ref_kdcl_teacher(zs, _np(soft), "best"))
    terms = kdcl_terms(nets, soft, variant="mean")
    close(terms[1]["ce"], 0.5 * ref_ce(zs[1], _np(soft)))
    with pytest.raises(ValueError, match="min_logit.*class-index labels"):
        kdcl_teacher(nets, soft, "min_logit")
    with pytest.raises(ValueError, match="unknown variant"):
        kdcl_teacher(nets, _labels(66), "linear")  # type: ignore[arg-type]


def test_kdcl_teacher_sends_no_gradient_to_the_other_networks() -> None:
    nets = _logits(67, 3)
    kdcl_terms(nets, _labels(68), variant="best")[0]["kd"].backward()
    assert nets[0].grad is not None and nets[1].grad is None and nets[2].grad is None


# --------------------------------------------------------------------------- FFL
def ref_depthwise3x3(x: Tensor, w: Tensor) -> Tensor:
    """Per-channel 3x3 convolution, zero padding 1: the sum over the 9 taps."""
    b, ch, h, wd = x.shape
    xp = torch.zeros(b, ch, h + 2, wd + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(b, ch, h, wd, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            out += xp[:, :, i : i + h, j : j + wd] * w[:, 0, i, j].view(1, ch, 1, 1)
    return out


def test_fusion_module_matches_reference() -> None:
    torch.manual_seed(0)
    ch = 4
    fusion = FusionModule(channels=ch, num_classes=C, branches=2).double()
    with torch.no_grad():
        for bn in (fusion.bn1, fusion.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    maps = [torch.randn(B, ch, 4, 4, generator=_gen(70 + i), dtype=torch.float64) for i in range(2)]
    x = torch.cat(maps, dim=1)
    x = ref_depthwise3x3(x, fusion.depthwise.weight.detach())
    x = torch.clamp(ref_batch_norm(x, fusion.bn1.weight.detach(), fusion.bn1.bias.detach(), (0, 2, 3)), min=0)
    x = torch.einsum("bchw,oc->bohw", x, fusion.pointwise.weight.detach()[:, :, 0, 0])
    x = torch.clamp(ref_batch_norm(x, fusion.bn2.weight.detach(), fusion.bn2.bias.detach(), (0, 2, 3)), min=0)
    pooled = x.sum(dim=(2, 3)) / 16
    expected = pooled @ fusion.fc.weight.detach().T + fusion.fc.bias.detach()
    close(fusion(maps), expected)
    assert fusion.depthwise.groups == 2 * ch and fusion.depthwise.bias is None and fusion.pointwise.bias is None


def test_fusion_module_initialisation_is_the_authors() -> None:
    torch.manual_seed(0)
    fusion = FusionModule(channels=64, num_classes=C)
    for conv in (fusion.depthwise, fusion.pointwise):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        expected_std = math.sqrt(2.0 / (k * conv.out_channels))
        assert float(conv.weight.detach().std()) == pytest.approx(expected_std, rel=0.1)


def test_ffl_terms_match_reference_and_detach_their_targets() -> None:
    branches = _logits(75, 2)
    (fused,) = _logits(76)
    y = _labels(77)
    zs, z_f = [_np(z) for z in branches], _np(fused)
    branch_terms, fused_terms = ffl_terms(branches, fused, y, weight=0.7)
    for i, t in enumerate(branch_terms):
        assert set(t) == {"ce", "kd"}
        close(t["ce"], ref_ce(zs[i], _np(y)))
        close(t["kd"], 0.7 * ref_kd(zs[i], z_f, 3.0, EPS))
    assert set(fused_terms) == {"ce", "kd"}
    close(fused_terms["ce"], ref_ce(z_f, _np(y)))
    close(fused_terms["kd"], 0.7 * ref_kd(z_f, (zs[0] + zs[1]) / 2, 3.0, EPS))

    torch.stack([t["kd"] for t in branch_terms]).sum().backward()
    assert fused.grad is None
    for z in branches:
        z.grad = None
    fused_terms["kd"].backward()
    assert all(z.grad is None for z in branches) and fused.grad is not None


# --------------------------------------------------------------------------- MCL
def ref_supcon(s: np.ndarray, y: np.ndarray, exclude_self: bool) -> float | None:
    """Mean over anchors with at least one positive; None when no anchor has one."""
    n = s.shape[0]
    losses = []
    for a in range(n):
        positives = [b for b in range(n) if y[b] == y[a] and not (exclude_self and b == a)]
        if not positives:
            continue
        denominator = [b for b in range(n) if not (exclude_self and b == a)]
        log_z = math.log(sum(math.exp(s[a, b]) for b in denominator))
        losses.append(-sum(s[a, b] - log_z for b in positives) / len(positives))
    return sum(losses) / len(losses) if losses else None


def _embeddings(seed: int, n: int, dim: int = 8) -> list[Tensor]:
    g = _gen(seed)
    return [torch.nn.functional.normalize(torch.randn(B, dim, generator=g, dtype=torch.float64), dim=1).requires_grad_()
            for _ in range(n)]


def test_projection_head_matches_reference() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(dim=6, out_dim=4, hidden=5).double()
    x = torch.randn(B, 6, generator=_gen(80), dtype=torch.float64)
    w1, b1, w2, b2 = (_np(p) for p in (head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias))
    expected = np.zeros((B, 4))
    for b in range(B):
        h = np.maximum(w1 @ _np(x[b]) + b1, 0.0)
        v = w2 @ h + b2
        expected[b] = v / math.sqrt(sum(e * e for e in v))
    close(head(x), expected)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_supcon_matches_reference(exclude_self: bool) -> None:
    v0, v1 = _embeddings(81, 2)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    for s in (v0 @ v0.T / 0.1, v0 @ v1.T / 0.1):
        close(supcon(s, y, exclude_self=exclude_self), ref_supcon(_np(s), _np(y), exclude_self))


def test_supcon_single_image_classes_are_left_out_without_nan() -> None:
    (v,) = _embeddings(82, 1)
    s = v @ v.T / 0.1
    y = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has a single image: no positive for anchor 5
    loss = supcon(s, y, exclude_self=True)
    close(loss, ref_supcon(_np(s), _np(y), True))
    loss.backward()
    assert torch.isfinite(loss) and v.grad is not None and torch.isfinite(v.grad).all()

    (u,) = _embeddings(83, 1)
    alone = supcon(u @ u.T / 0.1, torch.arange(B), exclude_self=True)
    assert float(alone.detach()) == 0.0
    alone.backward()
    assert u.grad is not None and torch.equal(u.grad, torch.zeros_like(u))
    with pytest.raises(ValueError, match="class-index labels"):
        supcon(s.detach(), torch.full((B, 3), 1 / 3), exclude_self=True)


def test_mcl_terms_match_the_total_of_the_formula() -> None:
    m, tau, t = 3, 0.1, 3.0
    emb = _embeddings(84, m)
    nets = _logits(85, m)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    vs, zs, ys = [_np(e) for e in emb], [_np(z) for z in nets], _np(y)
    sim = [[vs[i] @ vs[j].T / tau for j in range(m)] for i in range(m)]
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    ce = sum(ref_ce(z, ys) for z in zs)
    vcl = sum(ref_supcon(sim[i][i], ys, True) for i in range(m))
    icl = sum(ref_supcon(sim[i][j], ys, True) for i, j in pairs)
    soft_vcl = sum(ref_kd(sim[i][i], sim[j][j], t) for i, j in pairs)
    soft_icl = sum(ref_kd(sim[i][j], sim[j][i], t) + ref_kd(sim[j][i], sim[i][j], t) for i, j in pairs if i < j)
    expected = ce + 0.1 * vcl + soft_vcl + 0.1 * icl + soft_icl

    terms = mcl_terms(emb, nets, y, tau=tau, temperature=t)
    assert all(set(d) == {"ce", "vcl", "soft_vcl", "icl", "soft_icl"} for d in terms)
    close(torch.stack([v for d in terms for v in d.values()]).sum(), expected, atol=1e-4)
    close(terms[1]["vcl"], 0.1 * ref_supcon(sim[1][1], ys, True))
    close(terms[1]["soft_icl"], sum(ref_kd(sim[1][j], sim[j][1], t) for j in (0, 2)))
    close(terms[1]["icl"], 0.1 * sum(ref_supcon(sim[1][j], ys, True) for j in (0, 2)))


def test_mcl_term_assignment_and_gradient_paths() -> None:
    emb = _embeddings(86, 2)
    terms = mcl_terms(emb, _logits(87, 2), torch.tensor([0, 1, 0, 2, 1, 2]))
    terms[0]["soft_vcl"].backward(retain_graph=True)
    assert emb[0].grad is not None and emb[1].grad is None  # the target S_11 is detached
    terms[0]["icl"].backward(retain_graph=True)
    assert emb[1].grad is not None  # S_01 = V_0 V_1^T / tau: both networks learn from ICL


def test_mcl_single_image_class_gives_no_nan() -> None:
    emb = _embeddings(88, 2)
    nets = _logits(89, 2)
    terms = mcl_terms(emb, nets, torch.tensor([0, 0, 1, 1, 3, 4]))
    total = torch.stack([v for d in terms for v in d.values()]).sum()
    total.backward()
    assert torch.isfinite(total)
    assert all(e.grad is not None and torch.isfinite(e.grad).all() for e in emb)


# --------------------------------------------------------------------------- SwitOKD
def ref_switch(p_s: np.ndarray, p_t: np.ndarray, y: np.ndarray) -> dict[str, float]:
    n, k = p_s.shape
    onehot = np.zeros((n, k))
    for b in range(n):
        onehot[b, int(y[b])] = 1.0
    d_s = sum(abs(p_s[b, c] - onehot[b, c]) for b in range(n) for c in range(k)) / n
    d_t = sum(abs(p_t[b, c] - onehot[b, c]) for b in range(n) for c in range(k)) / n
    gap = sum(abs(p_s[b, c] - p_t[b, c]) for b in range(n) for c in range(k)) / n
    eps = math.exp(-d_t / (d_t + d_s))
    delta = d_s - eps * d_t
    return {"d_s": d_s, "d_t": d_t, "G": gap, "eps": eps, "delta": delta, "expert": gap > delta and d_t < d_s}


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    return np.stack([np.exp(ref_log_softmax(row)) for row in z])


def test_switch_statistics_match_reference() -> None:
    z_s, z_t = _logits(90, 2)
    y = _labels(91)
    stats = switch_statistics(z_s, z_t, y)
    expected = ref_switch(_softmax_rows(_np(z_s)), _softmax_rows(_np(z_t)), _np(y))
    for key in ("d_s", "d_t", "G", "eps", "delta"):
        close(stats[key], expected[key])
    assert stats["expert"].dim() == 0 and stats["expert"].dtype == torch.bool
    assert bool(stats["expert"]) == expected["expert"]


def test_switch_picks_expert_and_learning_mode() -> None:
    y = torch.tensor([0])
    good = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64).log()
    off = torch.tensor([[0.4, 0.59, 0.01]], dtype=torch.float64).log()
    # teacher close to y, student far and off the teacher's line: d_t = 0.4, d_s = 1.2, G = 0.98 > delta = 0.889
    expert = switch_statistics(off, good, y)
    close(expert["delta"], 1.2 - math.exp(-0.4 / 1.6) * 0.4)
    assert bool(expert["expert"])
    # the roles swapped: the teacher is the worse one (d_t > d_s), so both learn
    assert not bool(switch_statistics(good, off, y)["expert"])
    # the student near the teacher: G small, below the threshold
    near = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64).log()
    assert not bool(switch_statistics(near, good, y)["expert"])


def test_switokd_terms() -> None:
    z_s, z_t = _logits(92, 2)
    y = _labels(93)
    s, t = _np(z_s), _np(z_t)
    student, teacher = switokd_terms(z_s, z_t, y, expert=True)
    assert teacher is None and set(student) == {"ce", "kl"}
    close(student["ce"], ref_ce(s, _np(y)))
    close(student["kl"], ref_kd(s, t, 1.0))
    student["kl"].backward()
    assert z_t.grad is None and z_s.grad is not None

    z_s.grad = None
    student, teacher = switokd_terms(z_s, z_t, y, expert=False)
    assert teacher is not None and set(teacher) == {"ce", "kl"}
    close(student["kl"], ref_kd(s, t, 1.0))
    close(teacher["ce"], ref_ce(t, _np(y)))
    close(teacher["kl"], ref_kd(t, s, 1.0))
    teacher["kl"].backward()
    assert z_s.grad is None and z_t.grad is not None

"""Wide ResNet of Zagoruyko & Komodakis, "Wide Residual Networks" (arXiv:1605.07146), for CIFAR.

WRN-``depth``-``k``: a 3x3 stem conv with 16 channels, then three stages of
``n = (depth - 4) / 6`` pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3)
with 16k, 32k and 64k channels; stages 2 and 3 start with stride 2. Where the shape
changes, the shortcut is a 1x1 conv applied to the block's pre-activated input (as in
the authors' code). A final BN-ReLU closes the trunk, so the feature map is post-activation.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from mutualkd.models._common import CifarNet
from mutualkd.models._register import build_cifar_model, cifar_default_cfgs, register_cifar_model

__all__ = ["CifarWideResNet", "CifarWideBlock", "CIFAR_WRN_MODELS"]

#: Names this module registers in timm.
CIFAR_WRN_MODELS: tuple[str, ...] = (
    "cifar_wrn_16_1",
    "cifar_wrn_16_2",
    "cifar_wrn_40_1",
    "cifar_wrn_40_2",
    "cifar_wrn_28_10",
)


class CifarWideBlock(nn.Module):
    """Pre-activation wide block, B(3,3) with dropout between the convs (Zagoruyko & Komodakis 2016)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # identity shortcuts carry the raw input, projections the pre-activated one
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return self.drop_path(out) + shortcut


class CifarWideResNet(CifarNet):
    """WRN-``depth``-``widen_factor`` for CIFAR (Zagoruyko & Komodakis 2016, arXiv:1605.07146) with timm's API.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: ``k``; stage widths are 16k, 32k, 64k.
        num_classes: classifier outputs; 0 gives no classifier (``forward`` returns pooled features).
        in_chans: input image channels.
        global_pool: timm pooling type for the head (``"avg"`` in the paper).
        drop_rate: dropout between the two convs of every block (the paper uses 0.3 on some runs).
        head_drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 1,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Wide ResNet widen_factor must be >= 1, got {widen_factor}")
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth = depth
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.head_drop_rate = head_drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False, **dd)
        rates = torch.linspace(0, drop_path_rate, 3 * n).tolist() if drop_path_rate > 0 else [0.0] * (3 * n)
        in_chs = 16
        feature_info: list[dict[str, Any]] = [{"num_chs": in_chs, "reduction": 1, "module": "conv1"}]
        reduction = 1
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                CifarWideBlock(
                    in_chs if j == 0 else width,
                    width,
                    stride=stride if j == 0 else 1,
                    drop_rate=drop_rate,
                    drop_path_rate=rates[i * n + j],
                    **dd,
                )
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            # the last stage is reported after the final BN-ReLU, as forward_features returns it
            module = f"layer{i + 1}" if i < 2 else "act"
            feature_info.append({"num_chs": width, "reduction": reduction, "module": module})
            in_chs = width
        self.feature_info = feature_info
        self.bn = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU(inplace=True)

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = self._make_head(num_classes, global_pool, **dd)
        self._init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise optimizer helpers."""
        return {
            "stem": r"^conv1",
            "blocks": [(r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)", None), (r"^bn", (99999,))],
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, H, W]`` to the post-activation map ``[B, 64k, H / 4, W / 4]``."""
        x = self.conv1(x)
        x = self._stages(x)
        return self.act(self.bn(x))



default_cfgs = cifar_default_cfgs(
    CIFAR_WRN_MODELS,
    paper_name="Wide Residual Networks",
    paper_ids="arXiv:1605.07146",
)


def _create(variant: str, depth: int, widen_factor: int, pretrained: bool, **kwargs: Any) -> CifarWideResNet:
    return build_cifar_model(
        CifarWideResNet, variant, pretrained, depth=depth, widen_factor=widen_factor, **kwargs
    )


@register_cifar_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-1 for CIFAR, ~0.18M parameters (Zagoruyko & Komodakis 2016)."""
    return _create("cifar_wrn_16_1", 16, 1, pretrained, **kwargs)


@register_cifar_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-2 for CIFAR, ~0.69M parameters (Zagoruyko & Komodakis 2016)."""
    return _create("cifar_wrn_16_2", 16, 2, pretrained, **kwargs)


@register_cifar_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-1 for CIFAR, ~0.57M parameters (Zagoruyko & Komodakis 2016)."""
    return _create("cifar_wrn_40_1", 40, 1, pretrained, **kwargs)


@register_cifar_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-2 for CIFAR, ~2.2M parameters (Zagoruyko & Komodakis 2016)."""
    return _create("cifar_wrn_40_2", 40, 2, pretrained, **kwargs)


@register_cifar_model
def cifar_wrn_28_10(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-28-10 for CIFAR, ~36.5M parameters (Zagoruyko & Komodakis 2016)."""
    return _create("cifar_wrn_28_10", 28, 10, pretrained, **kwargs)

"""The CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Sec. 4.2.

A 3x3 stem conv with 16 channels, then three stages of ``n = (depth - 2) / 6`` basic
blocks with 16, 32 and 64 channels; stages 2 and 3 start with stride 2. Blocks are
post-activation (conv-BN-ReLU-conv-BN, add, ReLU). Where the shape changes the shortcut
is a 1x1 conv + BN projection (the paper's option B; the paper's CIFAR numbers use
option A, zero padding, which has no parameters: option B adds ~2.7k of them).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from mutualkd.models._common import CifarNet
from mutualkd.models._register import build_cifar_model, cifar_default_cfgs, register_cifar_model

__all__ = ["CifarResNet", "CifarBasicBlock", "CIFAR_RESNET_MODELS"]

#: Names this module registers in timm.
CIFAR_RESNET_MODELS: tuple[str, ...] = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110")

_WIDTHS = (16, 32, 64)


class CifarBasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016, Fig. 2 left) with an option-B projection shortcut."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.downsample: nn.Module
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )
        else:
            self.downsample = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class CifarResNet(CifarNet):
    """CIFAR ResNet-``depth`` (He et al. 2016, arXiv:1512.03385) with timm's model API.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs; 0 gives no classifier (``forward`` returns pooled features).
        in_chans: input image channels.
        global_pool: timm pooling type for the head (``"avg"`` in the paper).
        drop_rate: dropout before the classifier (timm's meaning of ``drop_rate``).
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = self.head_drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, _WIDTHS[0], 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0], **dd)
        self.act1 = nn.ReLU(inplace=True)

        rates = torch.linspace(0, drop_path_rate, 3 * n).tolist() if drop_path_rate > 0 else [0.0] * (3 * n)
        in_chs = _WIDTHS[0]
        feature_info: list[dict[str, Any]] = [{"num_chs": in_chs, "reduction": 1, "module": "act1"}]
        reduction = 1
        for i, width in enumerate(_WIDTHS):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                CifarBasicBlock(
                    in_chs if j == 0 else width,
                    width,
                    stride=stride if j == 0 else 1,
                    drop_path_rate=rates[i * n + j],
                    **dd,
                )
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            feature_info.append({"num_chs": width, "reduction": reduction, "module": f"layer{i + 1}"})
            in_chs = width
        self.feature_info = feature_info

        self.num_features = self.head_hidden_size = _WIDTHS[-1]
        self.global_pool, self.fc = self._make_head(num_classes, global_pool, **dd)
        self._init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise optimizer helpers."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, H, W]`` to last-stage feature map ``[B, 64, H / 4, W / 4]``."""
        return self._stages(self.act1(self.bn1(self.conv1(x))))



default_cfgs = cifar_default_cfgs(
    CIFAR_RESNET_MODELS,
    paper_name="Deep Residual Learning for Image Recognition",
    paper_ids="arXiv:1512.03385",
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, depth=depth, **kwargs)


@register_cifar_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR, ~0.27M parameters (He et al. 2016)."""
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_cifar_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR, ~0.46M parameters (He et al. 2016)."""
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_cifar_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR, ~0.85M parameters (He et al. 2016)."""
    return _create("cifar_resnet56", 56, pretrained, **kwargs)


@register_cifar_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR, ~1.7M parameters (He et al. 2016)."""
    return _create("cifar_resnet110", 110, pretrained, **kwargs)

"""CIFAR model families registered in timm's own registry.

Importing this package registers ``cifar_resnet{20,32,56,110}`` (He et al. 2016) and
``cifar_wrn_{16_1,16_2,40_1,40_2,28_10}`` (Zagoruyko & Komodakis 2016), after which
``timm.create_model("cifar_wrn_16_2", num_classes=100)`` works. Each name also has the
pretrained-cfg tags ``.cifar10`` (default) and ``.cifar100``, which set ``num_classes``
and the normalisation statistics; neither has weights.
"""

from __future__ import annotations

from mutualkd.models._register import NoPretrainedWeightsError, register_cifar_model
from mutualkd.models.cifar_resnet import CIFAR_RESNET_MODELS, CifarResNet
from mutualkd.models.cifar_wrn import CIFAR_WRN_MODELS, CifarWideResNet

__all__ = [
    "CIFAR_MODELS",
    "CifarResNet",
    "CifarWideResNet",
    "NoPretrainedWeightsError",
    "register_cifar_model",
]

#: Every timm model name this package registers.
CIFAR_MODELS: tuple[str, ...] = CIFAR_RESNET_MODELS + CIFAR_WRN_MODELS

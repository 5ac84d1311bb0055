"""mutualkd: mutual learning and knowledge distillation for timm models.

Importing the package registers the CIFAR model families into timm's registry
(``timm.create_model("cifar_wrn_16_2")``). Strategies and metrics are plugins found
through the entry-point groups ``mutualkd.strategies`` and ``mutualkd.metrics``.
"""

from mutualkd import models as models  # noqa: F401  (registers cifar_* models in timm)
from mutualkd import registry as registry
from mutualkd.registry import get_metric, get_strategy
from mutualkd.config import Recipe, load_recipe
from mutualkd.errors import CheckpointError, DataError, PluginError, RecipeError, UserError
from mutualkd.strategy import (
    LossTerms,
    PeerInfo,
    PeerOutput,
    SetupContext,
    Stage,
    Step,
    StepContext,
    Strategy,
    StrategyParams,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Recipe",
    "load_recipe",
    "registry",
    "get_strategy",
    "get_metric",
    "Strategy",
    "StrategyParams",
    "Step",
    "Stage",
    "StepContext",
    "SetupContext",
    "PeerInfo",
    "PeerOutput",
    "LossTerms",
    "UserError",
    "RecipeError",
    "DataError",
    "PluginError",
    "CheckpointError",
]

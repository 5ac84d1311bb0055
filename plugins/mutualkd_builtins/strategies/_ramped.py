"""Parameters shared by the online methods whose distillation weight ramps up (ONE, OKDDip, FFL, PCL).

Their authors' code multiplies the KD terms by ``exp(-5 (1 - e/L)^2)`` for the first L
epochs (:func:`mutualkd_builtins.losses.sigmoid_rampup`) and distils at temperature 3.
"""

from __future__ import annotations

from pydantic import Field

from mutualkd.strategy import StrategyParams
from mutualkd_builtins.losses import sigmoid_rampup


class RampedKDParams(StrategyParams):
    temperature: float = Field(3.0, ge=0.05, le=100.0, description="softmax temperature T of the distillation (authors: 3)")
    rampup_epochs: int = Field(
        80, ge=0, description="length L of the ramp exp(-5 (1 - e/L)^2) on the distillation weight (authors: 80 of 300"
        " epochs; 0: full weight from the start)"
    )

    def kd_weight(self, epoch: int) -> float:
        """The ramp's value at ``epoch`` (0-based), the weight of every KD term."""
        return sigmoid_rampup(epoch, self.rampup_epochs)

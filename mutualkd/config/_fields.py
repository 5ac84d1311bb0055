"""What every recipe table shares: the strict base model, the limits on values, small field checks."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_IMAGE_SIZE", "MAX_LR", "MAX_NAME_BYTES", "MAX_NESTING", "MAX_RECIPE_BYTES", "MAX_SEED", "PositiveInt"]


class _Strict(BaseModel):
    # No float field of a recipe takes inf or NaN: torch and the OS would take them, and fail later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0)]


#: Limits on what a recipe may ask for: its file's size, the nesting of its tables and
#: arrays, a run folder's name (bytes: the file-system limit), the side of resized images.
MAX_RECIPE_BYTES = 1 << 20
MAX_NESTING = 32
MAX_NAME_BYTES = 255
MAX_IMAGE_SIZE = 4096
#: Seeds are what torch, NumPy and Python all take: 0 .. 2**32 - 1 (NumPy's legacy seeding is 32-bit).
MAX_SEED = 2**32 - 1
#: The largest base learning rate a recipe may ask for. The optimizers apply it in float32 (largest
#: value 3.4e38): 1e12 leaves room for the linear scaling rule and large gradients, and still lets a
#: run diverge on purpose (the non-finite guard's tests do, with 1e12). Published recipes stay below 30.
MAX_LR = 1e12


def _seed_in_range(v: Any, field: str) -> Any:
    """A seed given as a number outside 0 .. MAX_SEED, refused with a plain message (not pydantic's int parse)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= MAX_SEED:
        raise ValueError(f"{field} must be an integer from 0 to {MAX_SEED} (2**32 - 1, what torch and NumPy take)")
    return v


def _path_problem(value: str) -> str | None:
    if "\x00" in value:
        return "holds a NUL character"
    if any(ord(c) < 32 for c in value):
        return "holds a control character"
    return None

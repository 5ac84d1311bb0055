"""timm's own weights, offline first: pretrained tags, ``hf-hub:`` repositories, timm model folders.

The implementation is :mod:`mutualkd.weights._hub`; this module keeps its public names where
they have always been imported from.
"""

from __future__ import annotations

from mutualkd.weights._hub import (
    FOLDER_WEIGHT_FILES,
    HUB_WEIGHT_FILES,
    cached_weights,
    fill_command,
    hub_repo_folder,
    load,
)

__all__ = ["load", "cached_weights", "hub_repo_folder", "fill_command", "HUB_WEIGHT_FILES", "FOLDER_WEIGHT_FILES"]

"""Shared test set-up."""

from __future__ import annotations

import os

# No test may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

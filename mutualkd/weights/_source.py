"""Weights sources, the bottom of :mod:`mutualkd.weights`: the shared types and the parser.

:class:`Source` is a parsed weights source (a run, a file, a timm model folder, a timm tag, an
``hf-hub:`` repository), :class:`Network` a model with its weights loaded; the switches that
decide whether a hub may be contacted live here too. Nothing here builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import re
from typing import Literal

from torch import nn

from mutualkd.errors import CheckpointError, UserError, unknown_name_hint

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "OFFLINE_ENV",
    "WEIGHT_SUFFIXES",
    "Source",
    "Network",
    "parse_source",
    "downloads_allowed",
    "hub_offline",
    "hub_cache",
]

#: Set to ``1`` to let timm download pretrained weights that are not in the cache.
ALLOW_DOWNLOAD_ENV = "MUTUALKD_ALLOW_DOWNLOAD"
#: Hugging Face's offline switch: when set, nothing is downloaded, whatever :data:`ALLOW_DOWNLOAD_ENV` says.
OFFLINE_ENV = "HF_HUB_OFFLINE"
#: What a weights file's name ends with.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

Kind = Literal["run", "file", "folder", "timm", "hf_hub"]


@dataclass(frozen=True)
class Source:
    """A parsed weights source: its kind and location (a path, a timm tag or a hub id)."""

    kind: Kind
    location: str
    text: str  # as the recipe wrote it

    def describe(self) -> str:
        return {"run": "mutualkd run", "file": "weights file", "folder": "timm model folder",
                "timm": "timm pretrained weights", "hf_hub": "Hugging Face hub weights"}[self.kind] + f" {self.location}"


@dataclass
class Network:
    """A timm model with its weights loaded, and what its weights expect of its inputs."""

    model: nn.Module
    model_name: str  # the architecture
    source: Source | None
    mean: tuple[float, ...] | None = None  # the normalisation the weights expect; None: the data set's
    std: tuple[float, ...] | None = None
    head_reset: bool = False  # the classifier is new (untrained)
    notes: list[str] = field(default_factory=list)


def hub_offline() -> bool:
    """Whether Hugging Face's offline mode is on: ``HF_HUB_OFFLINE`` set now, or when huggingface_hub was imported."""
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, at import; one set later must count too.
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def downloads_allowed() -> bool:
    """Whether timm may download: the user allowed it (``MUTUALKD_ALLOW_DOWNLOAD=1``) and the hub is not offline."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes") and not hub_offline()


def hub_cache() -> Path:
    """The Hugging Face hub cache folder this process uses (``HF_HUB_CACHE``, ``HF_HOME``/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------- parsing
#: A Hugging Face repository id as hf-hub: takes it: [ORG/]NAME[@REVISION], each part a plain name.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
                     r"(?:@[A-Za-z0-9._/-]{1,100})?")


def _is_run_folder(p: Path) -> bool:
    return (p / "meta.json").is_file() or (p / "state.pt").is_file() or (p / "checkpoints").is_dir()


def parse_source(text: str, *, where: str) -> Source:
    """Which kind of source ``text`` names, or a UserError saying what it is not (``where``: file [field])."""
    text = str(text).strip()
    kinds = ("a mutualkd run or checkpoint folder, a weights file (.safetensors, .pth, .pt, .bin), a timm model"
             " folder (config.json + model.safetensors), a timm pretrained tag (e.g. resnet34.a1_in1k) or hf-hub:ORG/NAME")
    if not text:
        raise UserError("the weights source is empty", where=where, hint=f"name {kinds}")
    if text.startswith("hf-hub:"):
        repo = text.removeprefix("hf-hub:")
        if not _HUB_ID.fullmatch(repo) or ".." in repo:
            raise UserError(f"{text!r} does not name a Hugging Face repository", where=where,
                            hint="write hf-hub:ORG/NAME (letters, digits, '-', '_' and '.', no '..'), optionally"
                            " with @REVISION, e.g. hf-hub:timm/resnet18.a1_in1k")
        return Source("hf_hub", repo, text)
    if text.startswith("local-dir:"):
        path = Path(text.removeprefix("local-dir:")).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: it is not a timm model folder", where=where,
                            hint="name a folder written by `mutualkd export` or timm's save_for_hf")
        return Source("folder", str(path), text)
    path = Path(text).expanduser()
    if path.is_dir():
        if _is_run_folder(path):
            return Source("run", str(path), text)
        if (path / "config.json").is_file():
            return Source("folder", str(path), text)
        raise UserError(f"the folder {path} is neither a mutualkd run or checkpoint folder nor a timm model folder",
                        where=where, hint=f"name {kinds}")
    if path.is_file():
        if path.name.endswith(WEIGHT_SUFFIXES):
            return Source("file", str(path), text)
        raise UserError(f"{path} is not a weights file (its name does not end with {', '.join(WEIGHT_SUFFIXES)})",
                        where=where, hint="save the weights with safetensors.torch.save_file(model.state_dict(), ...)")
    if text.endswith(WEIGHT_SUFFIXES) or "/" in text or "\\" in text or text.startswith((".", "~")):
        raise CheckpointError(f"{path} not found: no complete checkpoint, weights file or model folder there"
                              f" (relative paths are read from {Path.cwd()})", where=where,
                              hint=f"check the path; it names {kinds}")
    import timm

    import mutualkd.models  # noqa: F401  (the CIFAR families are timm models)

    if timm.is_model(text):
        return Source("timm", text, text)
    raise UserError(f"{text!r} is no file, no folder and no timm model name", where=where,
                    hint=unknown_name_hint("timm model", text.split(".")[0], timm.list_models()) + f"; name {kinds}")

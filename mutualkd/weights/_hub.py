"""timm's own weights, offline first: pretrained tags, ``hf-hub:`` repositories, timm model folders.

The three kinds of :mod:`mutualkd.weights` sources that timm knows how to load are loaded by
timm itself, through ``timm.create_model(..., pretrained=True)``, so that timm's
model-specific conversions (checkpoint filters, position-embedding resizing, input-channel
adaptation) apply:

* a tag (``resnet34.a1_in1k``): its file is looked up in the Hugging Face cache
  (:func:`cached_weights`) and handed to timm as ``pretrained_cfg_overlay=dict(file=...)``;
* ``hf-hub:ORG/NAME``: its cached snapshot folder (``config.json`` and the weights) is a
  timm model folder, loaded as ``local-dir:<snapshot>``;
* a timm model folder: ``timm.create_model("local-dir:<folder>", pretrained=True)``.

Nothing here contacts a hub unless :func:`mutualkd.weights.downloads_allowed` (never while
``HF_HUB_OFFLINE`` is set); then timm downloads as it always does (into the same cache).
Before timm builds anything, the source's classifier is compared with the data set's
classes (timm itself would silently drop a head of the wrong size).

Only public interfaces are used: ``timm.create_model``, ``timm.models.get_pretrained_cfg`` and
``load_model_config_from_hf``, huggingface_hub's cache lookup, torch.hub's folder. A timm model
folder's ``config.json`` is read here (:func:`read_model_config`) to check it before timm builds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from mutualkd.errors import UserError, unknown_name_hint
from mutualkd.trust import UnsafeFileError
from mutualkd.weights._source import (ALLOW_DOWNLOAD_ENV, OFFLINE_ENV, Network, Source, downloads_allowed, hub_cache,
                                      hub_offline)

__all__ = ["load", "cached_weights", "hub_repo_folder", "fill_command", "pretrained_cfg", "default_tag", "hf_split",
           "read_model_config"]

#: Weight files timm looks for in a hub repository, in its order (safetensors first).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Weight files timm looks for in a model folder (the common ones of timm's preferred files).
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def default_tag(model: str, where: str) -> str:
    """timm's default pretrained tag of ``model`` (``resnet18`` -> ``resnet18.a1_in1k``)."""
    import timm

    import mutualkd.models  # noqa: F401

    cfg = pretrained_cfg(model, where)
    return f"{timm.models.get_arch_name(model)}.{cfg.tag}" if cfg.tag else model


def pretrained_cfg(tag: str, where: str) -> Any:
    """timm's pretrained config of ``tag``, or a UserError when timm has no weights for it."""
    import timm

    arch = timm.models.get_arch_name(tag)
    try:
        cfg = timm.models.get_pretrained_cfg(tag)
    except RuntimeError:
        tags = timm.list_pretrained(f"{arch}.*")
        raise UserError(f"timm has no pretrained weights tagged {tag!r}", where=where,
                        hint=unknown_name_hint("pretrained tag", tag, tags)) from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(f"timm publishes no pretrained weights for {tag!r}", where=where,
                        hint="train it with mutualkd first and name that run (weights = \"runs/...\"), or choose a"
                        f" model timm has weights for (timm.list_pretrained('{arch.split('_')[0]}*'))")
    return cfg


def hf_split(hub_id: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` -> ``(ORG/NAME, REVISION or None)``, as timm splits an ``hf-hub:`` id."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def hub_repo_folder(repo_id: str) -> Path:
    """Where the Hugging Face cache keeps ``repo_id`` (``models--ORG--NAME``)."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _cached_hub_file(repo_id: str, revision: str | None, filenames: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache(), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def cached_weights(cfg: Any) -> tuple[Path | None, list[Path]]:
    """The cached weight file of a timm pretrained config (None if absent), and the folders looked in."""
    import torch.hub

    looked: list[Path] = []
    if cfg.hf_hub_id:
        repo, revision = hf_split(cfg.hf_hub_id)
        looked.append(hub_repo_folder(repo))
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        found = _cached_hub_file(repo, revision, files)
        if found is not None:
            return found, looked
    if cfg.url:
        folder = Path(torch.hub.get_dir()) / "checkpoints"  # where timm keeps files downloaded by URL
        looked.append(folder)
        path = folder / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path, looked
    return None, looked


def fill_command(name: str) -> str:
    """The command that puts ``name``'s weights into the cache, on a machine with a network."""
    return f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""


def _not_cached(label: str, name: str, looked: list[Path], where: str) -> UserError:
    """Weights absent from the cache: why nothing was downloaded (offline, or not allowed), and the ways out."""
    folders = ", ".join(str(p) for p in looked) or str(hub_cache())
    first = looked[0] if looked else hub_cache()
    fill = (f"on a machine with a network run `{fill_command(name)}`, then copy the folder it fills ({first}) to"
            " the same place here, or point HF_HUB_CACHE at a copy of that cache")
    if hub_offline():
        return UserError(
            f"the pretrained weights {label} are not in the cache (looked in {folders}), and {OFFLINE_ENV} is set:"
            " the hub is offline, so nothing is downloaded",
            where=where,
            hint=f"{fill}; or unset {OFFLINE_ENV} and set {ALLOW_DOWNLOAD_ENV}=1 to let mutualkd download them; or"
            " name a local weights file or timm model folder instead (weights = \"path/model.safetensors\")",
        )
    return UserError(
        f"the pretrained weights {label} are not in the cache (looked in {folders}), and mutualkd downloads"
        " nothing unless allowed",
        where=where,
        hint=f"{fill}; or let mutualkd download it: {ALLOW_DOWNLOAD_ENV}=1",
    )


def _check_head(src_classes: Any, num_classes: int, label: str, reset_head: bool, where: str) -> None:
    if reset_head or src_classes is None or int(src_classes) == num_classes:
        return
    raise UserError(
        f"the classifier of {label} has {int(src_classes)} classes, this recipe's data set has {num_classes}",
        where=where,
        hint="set reset_head = true for a new, untrained classifier (a features-only teacher such as IE-KD's, or"
        " fine-tuning), or use weights trained on these classes",
    )


def _check_arch(arch: str, model: str | None, label: str, where: str) -> None:
    import timm

    if model is not None and timm.models.get_arch_name(model) != arch:
        raise UserError(f"{label} are weights of a '{arch}', the recipe names '{model}'", where=where,
                        hint=f"set the model to \"{arch}\", or name weights of a '{model}'")


def _create(name: str, label: str, overlay: dict[str, Any] | None, num_classes: int, in_chans: int,
            kwargs: dict[str, Any] | None, where: str, weights_file: Path | None) -> nn.Module:
    """``timm.create_model(name, pretrained=True, ...)``, every failure a UserError naming the source."""
    import timm

    import mutualkd.models  # noqa: F401

    extra = dict(kwargs or {})
    if overlay:
        extra["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **extra)
    except TypeError as e:
        raise UserError(f"model '{name}' does not accept these kwargs: {e}", where=where,
                        hint="remove or rename the keyword") from None
    except UserError:
        raise
    except Exception as e:  # a pickle refused, a state dict that does not fit, a hub that cannot be reached
        text = str(e)
        if "weights_only" in text:
            raise UnsafeFileError(
                f"{weights_file or label} holds pickled objects other than tensors; unpickling them could run code,"
                " so the weights are not loaded", where=where,
                hint="if you trust the file, save its tensors with safetensors.torch.save_file and name that file",
            ) from None
        first = (text.strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"timm cannot load {label}: {type(e).__name__}: {first}", where=where,
                        hint="check that the weights are of this architecture (and its kwargs)") from None
    for attr in ("forward_features", "forward_head"):
        if not hasattr(model, attr):
            raise UserError(f"model '{name}' lacks timm's {attr}()", where=where, hint="use a model built on timm's API")
    return model


def _norm(cfg: dict[str, Any]) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    mean, std = cfg.get("mean"), cfg.get("std")
    return (tuple(float(v) for v in mean) if mean else None), (tuple(float(v) for v in std) if std else None)


def load(src: Source, model: str | None, num_classes: int, in_chans: int, kwargs: dict[str, Any] | None,
         reset_head: bool, where: str, arch_where: str | None = None) -> Network:
    """A timm tag, hf-hub repository or timm model folder, built and loaded by timm.

    ``where`` names the source's recipe field, ``arch_where`` the field naming the architecture.
    """
    arch_where = arch_where or where
    if src.kind == "timm":
        return _from_tag(src, model, num_classes, in_chans, kwargs, reset_head, where, arch_where)
    if src.kind == "hf_hub":
        return _from_hub(src, model, num_classes, in_chans, kwargs, reset_head, where, arch_where)
    return _from_folder(src, Path(src.location), model, num_classes, in_chans, kwargs, reset_head, where, arch_where)


def _finish(net: nn.Module, arch: str, src: Source, cfg: dict[str, Any], num_classes: int, reset_head: bool,
            in_chans: int) -> Network:
    if reset_head and int(cfg.get("num_classes") or 0) == num_classes:
        net.reset_classifier(num_classes)  # type: ignore[operator]  # timm kept the head; a new one was asked for
    src_chans = int((cfg.get("input_size") or (in_chans,))[0])
    mean, std = _norm(cfg)
    out = Network(net, arch, src, mean=mean, std=std, head_reset=reset_head)
    if reset_head:
        out.notes.append("new classifier (reset_head)")
    if src_chans != in_chans:
        out.notes.append(f"first convolution adapted from {src_chans} to {in_chans} input channel(s) by timm")
    return out


def _from_tag(src: Source, model: str | None, num_classes: int, in_chans: int, kwargs: dict[str, Any] | None,
              reset_head: bool, where: str, arch_where: str) -> Network:
    import timm

    tag = src.location
    cfg = pretrained_cfg(tag, where)
    arch = timm.models.get_arch_name(tag)
    label = f"'{arch}.{cfg.tag}'" if cfg.tag else f"'{tag}'"
    _check_arch(arch, model, label, arch_where)
    _check_head(cfg.num_classes, num_classes, label, reset_head, where)
    name = f"{arch}.{cfg.tag}" if cfg.tag else tag
    found, looked = cached_weights(cfg)
    if found is None and not downloads_allowed():
        raise _not_cached(label, name, looked, where)
    # A cached file goes to timm as a file override: timm's own loading, no hub involved.
    net = _create(name, label, {"file": str(found)} if found else None, num_classes, in_chans, kwargs, where, found)
    return _finish(net, arch, Source("timm", f"{name} ({found or 'downloaded'})", src.text), cfg.to_dict(),
                   num_classes, reset_head, in_chans)


def _from_hub(src: Source, model: str | None, num_classes: int, in_chans: int, kwargs: dict[str, Any] | None,
              reset_head: bool, where: str, arch_where: str) -> Network:
    from timm.models import load_model_config_from_hf

    repo, revision = hf_split(src.location)
    config = _cached_hub_file(repo, revision, ("config.json",))
    if config is not None and any((config.parent / f).is_file() for f in FOLDER_WEIGHT_FILES):
        net = _from_folder(src, config.parent, model, num_classes, in_chans, kwargs, reset_head, where, arch_where)
        net.source = Source("hf_hub", f"{src.location} ({config.parent})", src.text)
        return net
    label = f"'hf-hub:{src.location}'"
    if not downloads_allowed():
        raise _not_cached(label, f"hf-hub:{src.location}", [hub_repo_folder(repo)], where)
    try:
        cfg, arch, _ = load_model_config_from_hf(src.location)
    except Exception as e:
        raise UserError(f"cannot download the config of {label}: {type(e).__name__}: {str(e)[:200]}", where=where,
                        hint="check the repository name and the network") from None
    _check_arch(arch, model, label, arch_where)
    _check_head(cfg.get("num_classes"), num_classes, label, reset_head, where)
    net = _create(f"hf-hub:{src.location}", label, None, num_classes, in_chans, kwargs, where, None)
    return _finish(net, arch, src, cfg, num_classes, reset_head, in_chans)


def read_model_config(folder: Path) -> tuple[dict[str, Any], Any, Any]:
    """A timm model folder's ``config.json`` as timm reads it: (pretrained config, architecture, model kwargs).

    Both of timm's layouts: ``{"architecture", "num_classes", "pretrained_cfg", "model_args"}``
    (what ``save_for_hf`` writes) and the older single table. Raises OSError, ValueError
    (not JSON), KeyError (no architecture) or TypeError (not a table).
    """
    with open(folder / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise TypeError(f"the file holds a {type(raw).__name__}, expected a table")
    if "pretrained_cfg" in raw:
        cfg, arch, args = raw["pretrained_cfg"], raw["architecture"], raw.get("model_args", {})
        if not isinstance(cfg, dict):
            raise TypeError(f"'pretrained_cfg' is a {type(cfg).__name__}, expected a table")
        cfg = dict(cfg)
        if "num_classes" in raw:
            cfg["num_classes"] = raw["num_classes"]
    else:  # the older layout: one table
        cfg = dict(raw)
        arch, args = cfg.pop("architecture"), {}
    cfg.update(file=str(folder), source="local-dir")
    if isinstance(args, dict) and args.get("in_chans") is not None and isinstance(cfg.get("input_size"), (list, tuple)):
        cfg["input_size"] = (args["in_chans"], *cfg["input_size"][1:])  # the weights' channels, as timm reads them
    return cfg, arch, args


def _config_problem(cfg: Any, arch: Any, args: Any) -> str | None:
    """What is of the wrong kind in a model folder's config (None: nothing); read before timm builds anything."""
    def numbers(v: Any, n: int | None = None) -> bool:
        return (isinstance(v, (list, tuple)) and bool(v) and (n is None or len(v) == n)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))

    if not isinstance(arch, str) or not arch:
        return f"'architecture' is {arch!r}, expected a timm model name"
    if not isinstance(args, dict):
        return f"'model_args' is a {type(args).__name__}, expected a table of keyword arguments"
    n = cfg.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 1_000_000:
        return f"'num_classes' is {str(n)[:40]!r} ({type(n).__name__}), expected a positive integer"
    for key, size in (("mean", None), ("std", None), ("input_size", 3)):
        if key in cfg and not numbers(cfg[key], size):
            return f"'{key}' is {str(cfg[key])[:60]!r}, expected a list of {size or 'per-channel'} finite numbers"
    return None


def _from_folder(src: Source, folder: Path, model: str | None, num_classes: int, in_chans: int,
                 kwargs: dict[str, Any] | None, reset_head: bool, where: str, arch_where: str) -> Network:
    label = f"the timm model folder {folder}"
    hint = "name a folder written by `mutualkd export` or timm's save_for_hf"
    try:
        cfg, arch, args = read_model_config(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{folder / 'config.json'} is not a timm model config: {type(e).__name__}: {str(e)[:200]}",
                        where=where, hint=hint) from None
    problem = _config_problem(cfg, arch, args)
    if problem:
        raise UserError(f"{folder / 'config.json'}: {problem}", where=where, hint=hint)
    weights = next((folder / f for f in FOLDER_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} has a config.json but no weights ({', '.join(FOLDER_WEIGHT_FILES)})", where=where,
                        hint="copy the model's model.safetensors next to its config.json")
    import mutualkd.models  # noqa: F401  (an exported CIFAR-family model)

    _check_arch(arch, model, label, arch_where)
    _check_head(cfg.get("num_classes"), num_classes, label, reset_head, where)
    net = _create(f"local-dir:{folder}", label, None, num_classes, in_chans, kwargs, where, weights)
    return _finish(net, arch, Source(src.kind, str(folder), src.text), cfg, num_classes, reset_head, in_chans)

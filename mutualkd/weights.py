"""Where a network's weights come from: one vocabulary for every place that takes a network.

A *weights source* is one string, the same in a ``[[peers]]`` table (``weights = ...``) and
in a strategy's teacher (``ie_kd``'s ``teacher = ...``):

* a **mutualkd run or checkpoint folder** (``runs/teacher``, ``runs/teacher/checkpoints/best``),
  with a peer name or index: the run's latest complete checkpoint, or that checkpoint;
* a **weights file**: ``.safetensors``, or a ``.pth`` / ``.pt`` / ``.bin`` torch state dict,
  also wrapped as timm and torch training scripts write them (``state_dict``, ``model``,
  ``state_dict_ema``, keys prefixed ``module.``), read with timm's ``load_state_dict``
  (``weights_only=True``: no pickled code runs). The file does not say which architecture
  it is: the ``model`` (``teacher_model``) names it;
* a **timm model folder** in Hugging Face layout (``config.json`` + ``model.safetensors``,
  what ``mutualkd export`` writes), as ``local-dir:PATH`` or a plain folder path;
* **timm's pretrained weights**: a tag (``resnet34.a1_in1k``; ``pretrained = true`` on a
  peer is the model's default tag) or ``hf-hub:ORG/NAME``, loaded by timm itself from the
  Hugging Face cache.

No hub is ever contacted unless the environment variable :data:`ALLOW_DOWNLOAD_ENV` is
``1`` and Hugging Face's offline mode (:data:`OFFLINE_ENV`) is off: a pretrained tag or hf-hub
repository that is not in the cache is a :class:`~mutualkd.errors.UserError` (exit 2) naming
the source, the cache folder and the command that fills it on a machine with a network.

Every source is checked against the network the recipe builds: a classifier head for
another number of classes is refused with both counts unless ``reset_head`` asks for a new
one (a features-only teacher, or fine-tuning); keys that do not fit are refused with the
first missing and unexpected names. A first convolution for another number of input
channels is adapted with timm's ``adapt_input_conv`` (as timm does for pretrained weights).
The normalisation the weights expect (their pretrained config's ``mean``/``std``) is returned
so that the engine feeds them inputs normalised their way (see :class:`mutualkd.peers.InputNorm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import re
from typing import Any, Literal

import torch
from torch import nn

from mutualkd.trust import UnsafeFileError
from mutualkd.errors import CheckpointError, UserError, unknown_name_hint

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "OFFLINE_ENV",
    "WEIGHT_SUFFIXES",
    "Source",
    "Network",
    "parse_source",
    "load_network",
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


# --------------------------------------------------------------------------- loading
def load_network(
    source: str | None,
    *,
    model: str | None,
    num_classes: int,
    in_chans: int,
    file: str,
    field: str,
    model_field: str | None = None,
    arch_field: str | None = None,
    pretrained: bool = False,
    peer: str | int | None = None,
    kwargs: dict[str, Any] | None = None,
    reset_head: bool = False,
) -> Network:
    """Build the network ``model`` (or the source's own architecture) with weights from ``source``.

    ``pretrained`` (without a source) is timm's default tag for ``model``. ``peer`` picks the
    peer of a run source (None: its first). ``kwargs`` are timm.create_model's (None: the
    run's own for a run source, none otherwise). Messages name ``file [field]``; an
    architecture that is not the source's names ``arch_field``, errors in building the
    model itself ``model_field`` (both default: ``field``). Raises a UserError (exit 2; a
    CheckpointError for a run source) for anything that does not fit.
    """
    from mutualkd.peers import create_peer

    where = f"{file} [{field}]"
    model_field = model_field or field
    arch_where = f"{file} [{arch_field or field}]"
    if source is None and not pretrained:
        if model is None:
            raise UserError("no architecture and no weights source", where=where, hint="name a timm model")
        net = create_peer(model, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs, file=file, field=model_field)
        return Network(net, model, None)
    if source is None:
        assert model is not None
        src = Source("timm", _default_tag(model, where), f"pretrained = true ({model})")
    else:
        src = parse_source(source, where=where)
    if peer not in (None, 0) and src.kind != "run":  # 0: the default of a teacher_peer
        raise UserError(f"a peer ({peer!r}) is named, but {src.describe()} is not a mutualkd run", where=where,
                        hint="leave the peer out, or name a run folder")
    if src.kind == "run":
        return _finite(_from_run(src, model, 0 if peer is None else peer, num_classes, in_chans, kwargs, reset_head,
                                 where, file, model_field, arch_where), where)
    if src.kind == "file":
        if model is None:
            raise UserError(f"{src.location} is a bare weights file, which does not say which architecture it is",
                            where=where, hint="name the timm architecture it was saved from (teacher_model = \"resnet18\")")
        state = read_weights_file(Path(src.location), where=where)
        net = create_peer(model, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs, file=file, field=model_field)
        out = Network(net, model, src)
        load_into(out, state, reset_head=reset_head, where=where)
        return _finite(out, where)
    from mutualkd import pretrained as timm_source

    return _finite(timm_source.load(src, model, num_classes, in_chans, kwargs, reset_head, where, arch_where), where)


def _finite(net: Network, where: str) -> Network:
    """``net``, unless its weights hold NaN or Inf (every loss would be non-finite at the first step)."""
    for name, t in net.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            src = net.source.describe() if net.source is not None else "the weights"
            raise _error(net)(f"{src} holds non-finite values (NaN or Inf) in {name!r}", where=where,
                              hint="name weights saved before training diverged (an earlier checkpoint),"
                              " or other weights")
    return net


def peer_network(pc: Any, i: int, *, num_classes: int, in_chans: int, file: str) -> Network:
    """The network of ``[[peers]]`` table ``i`` (a :class:`~mutualkd.config.PeerConfig`), its weights loaded."""
    key = "pretrained" if pc.pretrained else "weights"
    return load_network(pc.weights, model=pc.model, num_classes=num_classes, in_chans=in_chans, file=file,
                        field=f"peers[{i}].{key}", model_field=f"peers[{i}]", arch_field=f"peers[{i}].model",
                        pretrained=pc.pretrained,
                        peer=pc.weights_peer, kwargs=pc.kwargs, reset_head=pc.reset_head)


def announce(net: Network, who: str) -> None:
    """One line (main process, the ``mutualkd`` logger) saying where ``who``'s weights came from and how they were fitted."""
    if net.source is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    from mutualkd._logging import get_logger

    extra = "".join(f"; {n}" for n in net.notes)
    get_logger(__name__).info("%s (%s): weights from %s%s", who, net.model_name, net.source.describe(), extra)


def _default_tag(model: str, where: str) -> str:
    """timm's default pretrained tag of ``model`` (``resnet18`` -> ``resnet18.a1_in1k``)."""
    import timm

    import mutualkd.models  # noqa: F401

    cfg = _pretrained_cfg(model, where)
    return f"{timm.models.get_arch_name(model)}.{cfg.tag}" if cfg.tag else model


def _pretrained_cfg(tag: str, where: str) -> Any:
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


def _from_run(src: Source, model: str | None, peer: str | int, num_classes: int, in_chans: int,
              kwargs: dict[str, Any] | None, reset_head: bool, where: str, file: str, model_field: str,
              arch_where: str) -> Network:
    from mutualkd import checkpoint as ckpt
    from mutualkd.peers import create_peer

    folder = ckpt.resolve_checkpoint(Path(src.location), where=where)
    meta = ckpt.read_meta(folder)
    peers: dict[str, Any] = meta.get("peers", {})
    names = list(peers)
    name = names[peer] if isinstance(peer, int) and 0 <= peer < len(names) else str(peer)
    if name not in peers:
        raise CheckpointError(f"the run in {folder} has no peer {peer!r}", where=where,
                              hint=unknown_name_hint("peer", str(peer), names))
    arch = peers[name]["model"]
    if model is not None and model != arch:
        raise CheckpointError(f"peer '{name}' of {folder} is a '{arch}', the recipe expects a '{model}'",
                              where=arch_where, hint=f"name \"{arch}\" there, or name another run or peer")
    try:
        state = ckpt.load_checkpoint(folder)
    except UnsafeFileError as e:
        e.where = e.where or where  # the message names the file; where names the recipe key
        raise
    weights = ckpt.peer_weights(state, peers[name], name)
    if not isinstance(weights, dict):
        raise CheckpointError(f"the checkpoint {folder} holds no weights for peer '{name}'", where=where,
                              hint="name another checkpoint of the run")
    spec = peers[name]
    net = create_peer(arch, num_classes=num_classes, in_chans=in_chans,
                      kwargs=spec.get("kwargs", {}) if kwargs is None else kwargs, file=file, field=model_field)
    out = Network(net, arch, Source("run", f"{folder} (peer {name})", src.text))
    out.mean, out.std = _tuple(spec.get("mean")), _tuple(spec.get("std"))  # a peer that had its own normalisation
    ds = meta.get("dataset", {})
    if ds.get("num_classes") != num_classes and not reset_head:
        raise CheckpointError(
            f"peer '{name}' of {folder} was trained on {ds.get('name')} with {ds.get('num_classes')} classes; this"
            f" recipe's data set has {num_classes} classes", where=where,
            hint="use a teacher trained on the same classes, or reset_head = true for a new, untrained classifier",
        )
    if out.mean is None and ds.get("mean") and ds.get("std"):
        out.mean, out.std = _tuple(ds.get("mean")), _tuple(ds.get("std"))
    load_into(out, weights, reset_head=reset_head, where=where, trained_on=ds.get("name"))
    return out


def _tuple(v: Any) -> tuple[float, ...] | None:
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) and v else None


def read_weights_file(path: Path, *, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, through timm's ``load_state_dict`` (``weights_only=True``).

    Wrappers (``state_dict_ema``/``model_ema`` first, as timm does, then ``state_dict``,
    ``model``) and ``module.`` / ``_orig_mod.`` prefixes are removed. A pickle that holds
    anything but tensors and plain containers is refused unread (:class:`UnsafeFileError`).
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except RuntimeError as e:
        if "weights_only" in str(e) or "pickle" in str(e):
            raise UnsafeFileError(
                f"{path} holds pickled objects other than tensors{_globals_of(path)}; unpickling them could run code,"
                " so the file is not loaded", where=where,
                hint="if you trust the file, save its tensors with safetensors: "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors'), and name that file",
            ) from None
        raise UserError(f"{path} cannot be read: {str(e)[:300]}", where=where, hint="check the file") from None
    except Exception as e:  # a truncated zip, a safetensors header that does not parse, ...
        raise UserError(f"{path} cannot be read as weights: {type(e).__name__}: {str(e)[:300]}", where=where,
                        hint="name a .safetensors file or a torch state dict (.pth, .pt, .bin)") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict", where=where, hint="save model.state_dict() to the file")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path} is not a state dict: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor",
                        where=where, hint="save model.state_dict() (tensors only) to the file")
    return state


def _globals_of(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


# --------------------------------------------------------------------------- fitting weights to a model
def classifier_names(model: nn.Module) -> list[str]:
    """The module names of the model's classifier (timm's ``pretrained_cfg['classifier']``, else ``get_classifier``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    found = [n for n in (names or []) if n in modules]
    if found:
        return found
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return [n for n, m in modules.items() if m is head and n] if head is not None else []


def _error(net: Network) -> type[UserError]:
    """CheckpointError for weights from a mutualkd run, UserError for the others (both exit 2)."""
    return CheckpointError if net.source is not None and net.source.kind == "run" else UserError


def load_into(net: Network, state: dict[str, torch.Tensor], *, reset_head: bool, where: str,
              trained_on: str | None = None) -> None:
    """Load ``state`` into ``net.model``: the head, the first convolution and every key checked."""
    model = net.model
    own = model.state_dict()
    state = dict(state)
    origin = net.source.location if net.source else "the weights"
    heads = classifier_names(model)
    head_keys = {k for h in heads for k in own if k.startswith(h + ".")}
    src_classes = next((int(state[k].shape[0]) for k in sorted(head_keys) if k.endswith("weight") and k in state), None)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if reset_head:
        for k in [k for h in heads for k in state if k.startswith(h + ".")]:
            del state[k]
        net.head_reset = True
        net.notes.append("new classifier (reset_head)")
    elif src_classes is not None and src_classes != num_classes:
        on = f" (trained on {trained_on})" if trained_on else ""
        raise _error(net)(
            f"the classifier of {origin}{on} has {src_classes} classes, this recipe's data set has {num_classes}",
            where=where,
            hint="set reset_head = true for a new, untrained classifier (a features-only teacher such as IE-KD's, or"
            " fine-tuning), or use weights trained on these classes",
        )
    _adapt_first_conv(net, state, own)
    skip = set(head_keys) if net.head_reset else set()
    missing = [k for k in own if k not in state and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(repr(k) for k in missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(repr(k) for k in unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (first: {k!r}: {tuple(state[k].shape)} in the weights,"
                         f" {tuple(own[k].shape)} in the model)")
        raise _error(net)(
            f"the weights of {origin} do not fit model '{net.model_name}': keys " + "; ".join(parts), where=where,
            hint="name the architecture (and kwargs) the weights were saved from",
        )
    model.load_state_dict(state, strict=False)  # every key checked above; reset heads keep their new weights


def _adapt_first_conv(net: Network, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Weights for 3-channel images into a 1-channel model (or the reverse): timm's ``adapt_input_conv``."""
    from timm.models import adapt_input_conv

    cfg = getattr(net.model, "pretrained_cfg", None) or {}
    convs = cfg.get("first_conv")
    for conv in [convs] if isinstance(convs, str) else list(convs or []):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1] \
                and state[key].shape[0] == own[key].shape[0] and state[key].shape[2:] == own[key].shape[2:]:
            src = int(state[key].shape[1])
            state[key] = adapt_input_conv(int(own[key].shape[1]), state[key])
            net.notes.append(f"first convolution adapted from {src} to {own[key].shape[1]} input channel(s)")


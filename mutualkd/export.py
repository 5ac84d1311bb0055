"""``mutualkd export``: a saved run's peers (or their EMA copies) as timm models that plain timm loads.

Each peer becomes a folder in timm's Hugging Face layout, written by timm's own
``save_for_hf``: ``model.safetensors`` (the timm model's ``state_dict``) and ``config.json``
(``architecture``, ``num_classes``, ``label_names``, ``model_args`` and timm's pretrained
config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``; plus a
``mutualkd`` block saying which run, checkpoint (relative to the run folder), peer and step
it came from), and a model card, ``README.md`` (:mod:`mutualkd.model_card`). No file names
an absolute path of this machine, so the folder can be uploaded to the Hugging Face Hub as
it is. It loads without mutualkd's engine::

    import mutualkd, timm            # importing mutualkd registers the CIFAR families in timm
    model = timm.create_model("local-dir:OUT", pretrained=True).eval()   # or "hf-hub:ORG/NAME", once uploaded
    cfg = model.pretrained_cfg       # feed it (x / 255 - cfg["mean"]) / cfg["std"] at cfg["input_size"]

or, into an architecture built by hand, ``timm.create_model(ARCH, pretrained=True,
pretrained_cfg_overlay=dict(file="OUT/model.safetensors"), num_classes=N, in_chans=C)``.
The same folder is a weights source of its own (``weights = "OUT"`` in a recipe).

The normalisation written is the one the peer's weights expect: the data set's, or the
peer's own when it started from weights normalised otherwise (see :mod:`mutualkd.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
from typing import Any, Literal

from mutualkd.errors import CheckpointError, UserError, unknown_name_hint
from mutualkd.model_card import check_card_options, model_card, portable
from mutualkd.names import inside, name_problem

__all__ = ["Exported", "export_peer", "export_run", "LABEL_NAMES"]

#: Class names of the data sets whose classes are fixed (image folders: their class folders).
LABEL_NAMES: dict[str, list[str]] = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclass(frozen=True)
class Card:
    """What the model card takes from the exporter rather than the run: a Hub license id and repository."""

    license_id: str | None = None
    repo_id: str | None = None


@dataclass
class Exported:
    """What :func:`export_peer` wrote."""

    folder: Path
    peer: str
    architecture: str
    ema: bool
    checkpoint: Path


def _checkpoint_folder(src: Path, which: Literal["best", "last"]) -> Path:
    from mutualkd import checkpoint as ckpt

    if (src / ckpt.META).is_file() or (src / ckpt.STATE).is_file():
        return src  # a checkpoint folder named directly
    if which == "best":
        best = src / "checkpoints" / "best"
        if not ckpt.is_complete(best):
            raise CheckpointError("the run has no complete best/ checkpoint", where=str(src),
                                  hint="export the latest checkpoint (--checkpoint last)")
        return best
    return ckpt.resolve_checkpoint(src, where=str(src))


def _run_folder(checkpoint: Path) -> Path | None:
    for p in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (p / "recipe.toml").is_file():
            return p
    return None


def _data_config(meta: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Input size, mean and std of the run's data set: from meta.json, or (older runs) from its recipe's data."""
    ds = dict(meta.get("dataset", {}))
    if not all(k in ds for k in ("mean", "std", "image_size")):
        run = _run_folder(checkpoint)
        if run is None:
            raise UserError("the checkpoint does not record its data set's input size and normalisation, and no"
                            " recipe.toml is next to it", where=str(checkpoint),
                            hint="export from the run folder, or from a checkpoint written by this mutualkd version")
        from mutualkd.config import load_recipe
        from mutualkd.data import check_data
        from mutualkd.errors import in_file

        recipe = load_recipe(run / "recipe.toml")
        try:
            info, _, _ = check_data(recipe.data, seed=recipe.run.seed, peers={})
        except UserError as e:
            raise in_file(e, str(run / "recipe.toml")) from None
        ds.update(mean=list(info.mean), std=list(info.std), image_size=list(info.image_size))
    return ds


def _label_names(dataset: str | None, checkpoint: Path) -> list[str] | None:
    if dataset in LABEL_NAMES:
        return LABEL_NAMES[dataset]
    run = _run_folder(checkpoint)
    if dataset == "image_folder" and run is not None:
        from mutualkd.config import load_recipe

        root = load_recipe(run / "recipe.toml").data.root
        train = Path(root or "./data") / "train"
        if train.is_dir():
            return sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    return None


def export_peer(run_or_checkpoint: str | Path, out: str | Path, *, peer: str | None = None, ema: bool = False,
                best: bool = False, checkpoint: Literal["best", "last"] | None = None, license_id: str | None = None,
                repo_id: str | None = None) -> Exported:
    """Write peer ``peer`` (default: the first) of a run's ``checkpoint`` (``last``, or ``best``) to ``out``.

    ``license_id`` (a Hub license id) and ``repo_id`` (``ORG/NAME``) go into the model card.
    """
    which: Literal["best", "last"] = checkpoint or ("best" if best else "last")
    check_card_options(license_id, repo_id)
    folder = _checkpoint_folder(Path(run_or_checkpoint), which)
    from mutualkd import checkpoint as ckpt

    meta = ckpt.read_meta(folder)
    peers: dict[str, Any] = meta.get("peers", {})
    name = peer or next(iter(peers), "")
    if name not in peers and name.endswith("_ema") and name.removesuffix("_ema") in peers:
        name, ema = name.removesuffix("_ema"), True  # <peer>_ema: the EMA copy, as it is named in metrics
    if name not in peers:
        raise UserError(f"the run has no peer {name!r}", where=str(folder), hint=unknown_name_hint("peer", name, list(peers)))
    state = ckpt.load_checkpoint(folder)  # weights_only: a checkpoint that asks to run code is refused
    return _write(folder, meta, state, name, Path(out), ema, Card(license_id, repo_id))


def export_run(run_or_checkpoint: str | Path, out: str | Path, *, peer: str | None = None, ema: bool = False,
               checkpoint: Literal["best", "last"] = "last", license_id: str | None = None,
               repo_id: str | None = None) -> list[Exported]:
    """One peer into ``out`` (``peer`` named), or every peer into ``out/<peer>``.

    Every peer is written into a temporary folder next to ``out`` first and moved into
    place once all of them are: a refusal or a failure leaves ``out`` as it was.
    """
    if peer is not None:
        return [export_peer(run_or_checkpoint, out, peer=peer, ema=ema, checkpoint=checkpoint, license_id=license_id,
                            repo_id=repo_id)]
    from mutualkd import checkpoint as ckpt

    check_card_options(license_id, repo_id)

    out = Path(out)
    folder = _checkpoint_folder(Path(run_or_checkpoint), checkpoint)
    meta = ckpt.read_meta(folder)
    state = ckpt.load_checkpoint(folder)
    names = list(meta.get("peers", {}))
    if ema:
        names = [n for n in names if n in state.get("callbacks", {}).get("ema", {})] or names
    _check_out(out, parent=True)
    for n in names:  # names read from a file: each must be one folder under out, and free there
        problem = name_problem(n) if isinstance(n, str) else "is not a string"
        if problem:
            raise CheckpointError(f"the peer name {n!r} in meta.json {problem}, so it cannot name a folder",
                                  where=str(folder / ckpt.META),
                                  hint="export another checkpoint, or one peer with --peer")
        _check_out(inside(out, out / n, what="the export folder", hint="export one peer with --peer and --out"))
    tmp = out.with_name(f".tmp-export-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        done = [_write(folder, meta, state, n, tmp / n, ema, Card(license_id, repo_id)) for n in names]
        if not out.exists():
            os.replace(tmp, out)
        else:  # out holds other files: each peer's folder (checked free above) is moved in
            for n in names:
                if (out / n).exists():
                    (out / n).rmdir()
                os.replace(tmp / n, out / n)
    except OSError as e:
        raise _cannot_write(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for d in done:
        d.folder = out / d.folder.name
    return done


def _cannot_write(out: Path, e: OSError) -> UserError:
    from mutualkd.errors import os_reason

    return UserError(f"cannot write the export: {os_reason(e)}", where=str(out),
                     hint="choose an --out on a disk you can write to, with free space")


def _check_out(out: Path, parent: bool = False) -> None:
    """``out`` can become the export: absent or an empty folder (``parent``: any folder), and writable."""
    if out.exists() and not out.is_dir():
        raise UserError("--out names a file, not a folder", where=str(out),
                        hint="choose another --out (a new folder), or move the file away")
    if out.is_dir() and not parent and any(out.iterdir()):
        raise UserError("the export folder exists and is not empty", where=str(out),
                        hint="choose another --out, or remove the folder")
    at = out.parent if not out.exists() else out
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir() or not os.access(at, os.W_OK):
        raise UserError(f"cannot write the export: {at} is not a folder this user may write to", where=str(out),
                        hint="choose an --out in a folder you can write to")


def _write(folder: Path, meta: dict[str, Any], state: dict[str, Any], name: str, out_dir: Path, ema: bool,
           card: Card) -> Exported:
    import timm
    from timm.models import save_for_hf
    import torch

    import mutualkd.models  # noqa: F401  (the CIFAR families are timm models)
    from mutualkd import checkpoint as ckpt

    spec = meta["peers"][name]
    if ema:
        saved = state.get("callbacks", {}).get("ema", {})
        mean = ckpt.peer_weights(state, spec, name, mean=True)  # a strategy's temporal mean (e.g. PCL's)
        if name not in saved and mean is None:
            have = ", ".join([*saved, *(n for n, sp in meta["peers"].items() if sp.get("mean_module"))]) or "none"
            raise UserError(f"peer '{name}' has no EMA copy in this checkpoint (EMA peers: {have})", where=str(folder),
                            hint="train with [ema] (or [peers.ema]) in the recipe, or export without --ema")
        weights = saved[name]["module"] if name in saved else mean
    else:
        weights = ckpt.peer_weights(state, spec, name)
        if weights is None:
            raise CheckpointError(f"the checkpoint holds no weights for peer '{name}'", where=str(folder),
                                  hint="export another checkpoint of the run")
    _check_out(out_dir)
    ds = _data_config(meta, folder)
    arch, kwargs = spec["model"], dict(spec.get("kwargs", {}))
    model = timm.create_model(arch, pretrained=False, num_classes=ds["num_classes"], in_chans=ds["in_chans"], **kwargs)
    try:
        model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
    except RuntimeError as e:
        raise CheckpointError(f"the weights of peer '{name}' do not fit '{arch}': {str(e)[:300]}", where=str(folder),
                              hint="the checkpoint's meta.json does not describe its weights; export another one") from None
    mean, std = spec.get("mean") or ds["mean"], spec.get("std") or ds["std"]
    h, w = ds["image_size"]
    data_config = {"input_size": (int(ds["in_chans"]), int(h), int(w)), "mean": tuple(mean), "std": tuple(std),
                   "crop_pct": 1.0, "interpolation": "bilinear"}
    run = _run_folder(folder)
    # Named relative to the run folder: the machine's own paths stay on the machine.
    where = folder.relative_to(run).as_posix() if run is not None else folder.name
    model_config: dict[str, Any] = {
        "pretrained_cfg": {"tag": f"mutualkd_{ds.get('name')}"},
        "mutualkd": {"run": run.name if run is not None else None, "checkpoint": where, "peer": name, "ema": ema,
                     "global_step": meta.get("global_step"), "epoch": meta.get("epoch"), "dataset": ds.get("name"),
                     "strategy": meta.get("strategy")},
    }
    labels = _label_names(ds.get("name"), folder)
    if labels is not None and len(labels) == model.num_classes:
        model_config["label_names"] = labels
    # Written next to the destination and renamed into place: an export is whole or absent.
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(out_dir, e) from None
    tmp = out_dir.with_name(f".tmp-export-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            save_for_hf(model.eval(), str(tmp), model_config=model_config, model_args=kwargs or None,
                        safe_serialization=True, data_config=data_config)
        config = portable(json.loads((tmp / "config.json").read_text()))[0]  # e.g. a path among model_args
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(encoding="utf-8", data=model_card(
            config=config, meta=meta, peer=name, ema=ema, checkpoint=where, run=run,
            num_params=sum(p.numel() for p in model.parameters()), license_id=card.license_id, repo_id=card.repo_id))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except OSError as e:
        raise _cannot_write(out_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out_dir, name, arch, ema, folder)

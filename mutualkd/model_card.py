"""The model card of an exported peer: the ``README.md`` the Hugging Face Hub shows for a timm model folder.

Its YAML front matter is what the Hub indexes: ``library_name: timm``, ``pipeline_tag``,
``tags`` (with the method's name), ``license`` when the exporter names one and ``datasets``
when the data set has a Hub id. Its body says only what the run recorded: the architecture,
the input the weights expect (the exported ``pretrained_cfg``), the data set, the method and
its parameters, the peer's test top-1 from ``summary.json``, the run's ``recipe.toml`` with
the commands that reproduce it, and how to load the folder with timm.

Nothing exported may name a place on the training machine: :func:`portable` replaces every
absolute path in the recipe, the method's parameters and ``config.json`` by
:data:`LOCAL_PATH`, and the card lists the recipe keys it replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
from typing import Any

from mutualkd.errors import UserError

__all__ = ["LOCAL_PATH", "HUB_DATASETS", "is_local_path", "portable", "check_card_options", "model_card"]

#: What an absolute path of the training machine becomes in an export.
LOCAL_PATH = "<local path>"
#: The Hugging Face Hub ids of the data sets that have one (the card's ``datasets``).
HUB_DATASETS = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}
#: A license as the Hub's ``license`` field takes it (``apache-2.0``, ``mit``, ``cc-by-4.0``, ``other``).
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_WINDOWS_PATH = re.compile(r"(?:[A-Za-z]:[\\/]|\\\\)")


def is_local_path(text: str) -> bool:
    """Whether ``text`` is an absolute path (``/...``, ``~...``, ``C:\\...``), bare or after ``local-dir:``."""
    bare = text.strip()
    for prefix in ("local-dir:", "file://", "file:"):
        bare = bare.removeprefix(prefix)
    return bare.startswith(("/", "~")) or bool(_WINDOWS_PATH.match(bare))


def portable(value: Any, key: str = "") -> tuple[Any, list[str]]:
    """``value`` (JSON or TOML data) with every absolute path replaced by :data:`LOCAL_PATH`, and the keys replaced.

    Keys are dotted, as ``--set`` writes them (``run.out_dir``, ``peers[1].weights``).
    """
    if isinstance(value, str):
        return (LOCAL_PATH, [key]) if is_local_path(value) else (value, [])
    if isinstance(value, dict):
        out, keys = {}, []
        for k, v in value.items():
            out[k], found = portable(v, f"{key}.{k}" if key else str(k))
            keys += found
        return out, keys
    if isinstance(value, (list, tuple)):
        done = [portable(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in done], [k for _, found in done for k in found]
    return value, []


def check_card_options(license_id: str | None, repo_id: str | None) -> None:
    """Refuse a ``--license`` or ``--repo-id`` the Hub would not take, before anything is written."""
    if license_id is not None and not _LICENSE.fullmatch(license_id):
        raise UserError(f"--license {license_id!r} is not a license id the Hugging Face Hub takes",
                        hint="write a lowercase id such as apache-2.0, mit, cc-by-4.0 or other")
    if repo_id is not None:
        from mutualkd.weights import parse_source

        if "/" not in repo_id:
            raise UserError(f"--repo-id {repo_id!r} names no organisation or user", hint="write --repo-id ORG/NAME")
        parse_source(f"hf-hub:{repo_id}", where="--repo-id")


# --------------------------------------------------------------------------- the card
def model_card(*, config: dict[str, Any], meta: dict[str, Any], peer: str, ema: bool, checkpoint: str,
               run: Path | None, num_params: int, license_id: str | None = None, repo_id: str | None = None) -> str:
    """The README.md of an export: ``config`` is its config.json (already :func:`portable`), ``meta`` the
    checkpoint's meta.json, ``checkpoint`` the checkpoint folder relative to ``run`` (the run folder, or None)."""
    from huggingface_hub import ModelCardData

    dataset = str(meta.get("dataset", {}).get("name") or "unknown")
    strategy = str(meta.get("strategy") or "unknown")
    summary = _read_json(run / "summary.json") if run is not None else None
    recipe = _read_recipe(run / "recipe.toml") if run is not None else None
    tags = ["image-classification", "timm", "mutualkd", strategy]
    front = ModelCardData(
        library_name="timm", pipeline_tag="image-classification", license=license_id, tags=tags,
        datasets=[HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else None,
        metrics=["accuracy"] if summary else None,
    ).to_yaml()
    arch = str(config["architecture"])
    lines = [
        "---", front, "---", "",
        f"# {arch} trained with {strategy} on {dataset}", "",
        f"{'The EMA copy of peer' if ema else 'Peer'} `{peer}` of "
        + (f"the mutualkd run `{run.name}`" if run is not None else "a mutualkd run")
        + f", checkpoint `{checkpoint}` (epoch {meta.get('epoch')}, step {meta.get('global_step')}), exported with"
        " `mutualkd export` as a timm model: `config.json` and `model.safetensors`.",
        "",
        *_model(config, peer, num_params, summary),
        *_input(config["pretrained_cfg"]),
        *_training(dataset, strategy, recipe, meta),
        *_results(summary, meta, peer, ema, dataset),
        *_reproduce(recipe, meta, summary, peer, ema, checkpoint),
        *_usage(arch, repo_id),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a run stopped before its end has no summary.json: the card reports no accuracy
    return data if isinstance(data, dict) else None


def _read_recipe(path: Path) -> tuple[dict[str, Any], list[str]] | None:
    """The run's recipe.toml as data, every absolute path replaced, and the keys replaced."""
    from mutualkd.config import read_toml

    try:
        return portable(read_toml(path))
    except (UserError, OSError):
        return None


def _model(config: dict[str, Any], peer: str, num_params: int, summary: dict[str, Any] | None) -> list[str]:
    labels = config.get("label_names") or []
    names = f" ({', '.join(map(str, labels))})" if len(labels) <= 20 else " (their names: `label_names` in config.json)"
    out = ["## Model", "",
           f"- Architecture: `{config['architecture']}` (timm), {num_params:,} parameters",
           f"- Classes: {config['num_classes']}" + (names if labels else "")]
    if config.get("model_args"):
        out.append(f"- Model arguments: `{json.dumps(config['model_args'])}`")
    peers = (summary or {}).get("peers")
    others = {n: m for n, m in peers.items() if n != peer} if isinstance(peers, dict) else {}
    if others:
        out.append("- Trained together with the run's other peers: "
                   + ", ".join(f"`{n}` ({m})" for n, m in others.items()))
    return [*out, ""]


def _input(pre: dict[str, Any]) -> list[str]:
    size = pre.get("input_size") or []
    rows = [("input size (channels, height, width)", " x ".join(map(str, size))),
            *((k, json.dumps(pre[k])) for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode") if k in pre)]
    return ["## Input", "",
            "What the weights expect (`pretrained_cfg` in config.json): pixel values scaled to [0, 1], then"
            " `(x - mean) / std` per channel.", "",
            "| | |", "| --- | --- |", *(f"| {k} | `{v}` |" for k, v in rows), ""]


def _training(dataset: str, strategy: str, recipe: tuple[dict[str, Any], list[str]] | None,
              meta: dict[str, Any]) -> list[str]:
    hub = f" ([{HUB_DATASETS[dataset]}](https://huggingface.co/datasets/{HUB_DATASETS[dataset]}))" \
        if dataset in HUB_DATASETS else ""
    out = ["## Training", "", f"- Data set: `{dataset}`{hub}", f"- Method: `{strategy}` (mutualkd strategy)"]
    if recipe is not None:
        data = recipe[0]
        mode = data.get("schedule", {}).get("mode")
        if mode:
            out.append(f"- Schedule: `{mode}`")
        epochs = data.get("run", {}).get("epochs")
        if epochs is not None:
            out.append(f"- Epochs in the recipe: {epochs}")
        params = _strategy_params(strategy, data.get("strategy", {}))
        out += ["", f"Parameters of `{strategy}`" + (" (defaults included):" if params[1] else " (as in the recipe):"),
                ""]
        rows = [f"| {k} | `{json.dumps(v)}` |" for k, v in params[0].items()]
        out += ["| parameter | value |", "| --- | --- |", *rows] if rows else ["none"]
    versions, n = meta.get("versions", {}), int(meta.get("num_processes") or 1)
    if versions:
        out += ["", "Trained with " + ", ".join(f"{k} {v}" for k, v in versions.items())
                + f" in {n} process{'es' if n > 1 else ''}."]
    return [*out, ""]


def _strategy_params(name: str, table: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The method's parameters, with their defaults when the strategy is installed (the bool: resolved)."""
    from pydantic import ValidationError

    from mutualkd.registry import get_strategy

    given = {k: v for k, v in table.items() if k != "name"}
    try:
        resolved = get_strategy(name).Params.model_validate(given).model_dump(mode="json")
    except (UserError, ValidationError):
        return given, False  # not installed here, or a parameter it no longer takes: the recipe's own table
    return portable(resolved)[0], True


def _results(summary: dict[str, Any] | None, meta: dict[str, Any], peer: str, ema: bool, dataset: str) -> list[str]:
    key = f"{peer}_ema" if ema else peer
    top1 = summary.get("top1", {}).get(key) if summary is not None else None
    if summary is None:
        return ["## Results", "", "No summary.json next to the checkpoint (the run did not finish, or the checkpoint"
                " was exported without its run folder): no test top-1 to report.", ""]
    if not isinstance(top1, dict):
        return ["## Results", "", f"The run's summary.json records no test top-1 for `{key}`.", ""]
    out = ["## Results", "", f"Top-1 accuracy on the `{dataset}` test split, from the run's summary.json:", "",
           "| | test top-1 (%) | epoch |", "| --- | --- | --- |",
           f"| end of training | {top1['final']:.2f} | {summary['epochs']} |",
           f"| best epoch of this network | {top1['best']:.2f} | {top1['best_epoch']} |"]
    at_best = summary.get("top1_at_best_epoch", {})
    if meta.get("kind") == "best" and key in at_best:
        out.append(f"| these weights (best/: the run's best epoch, chosen by `{summary.get('best_output')}` on the"
                   f" {summary.get('best_chosen_by')} split) | {at_best[key]:.2f} | {summary.get('best_epoch')} |")
    elif meta.get("global_step") == summary.get("global_steps"):
        out.append(f"| these weights (the last checkpoint) | {top1['final']:.2f} | {summary['epochs']} |")
    return [*out, ""]


def _reproduce(recipe: tuple[dict[str, Any], list[str]] | None, meta: dict[str, Any], summary: dict[str, Any] | None,
               peer: str, ema: bool, checkpoint: str) -> list[str]:
    from mutualkd.runlog import dump_toml

    if recipe is None:
        return ["## Reproduce", "", "The checkpoint was exported without its run folder: no recipe to show.", ""]
    data, replaced = recipe
    run = data.get("run", {})
    run_dir = f"{run.get('out_dir', 'runs')}/{run.get('name', 'run')}"
    n = int(meta.get("num_processes") or 1)
    train = f"torchrun --nproc_per_node {n} -m mutualkd run recipe.toml" if n > 1 else "mutualkd run recipe.toml"
    if meta.get("kind") == "best":
        source = f"{run_dir} --checkpoint best"
    elif summary is not None and meta.get("global_step") == summary.get("global_steps"):
        source = run_dir  # the latest checkpoint, export's default
    else:
        source = f"{run_dir}/{checkpoint}"
    out = ["## Reproduce", "", "Save the run's recipe below as `recipe.toml`, then:", "", "```bash", train,
           f"mutualkd export {source} --peer {peer}{' --ema' if ema else ''} --out {peer}", "```", ""]
    if replaced:
        out += [f"`{LOCAL_PATH}` stands for an absolute path of the training machine; set "
                + ", ".join(f"`{k}`" for k in replaced) + " to one of yours first.", ""]
    return [*out, "```toml", dump_toml(data).rstrip(), "```", ""]


def _usage(arch: str, repo_id: str | None) -> list[str]:
    import timm

    repo = repo_id or "ORG/NAME"
    own = timm.models.model_entrypoint(arch).__module__.startswith("mutualkd")
    return ["## Use", "", "```python", "import timm",
            *([f"import mutualkd  # registers {arch} in timm (pip install mutualkd)"] if own else []), "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            '# or from a local copy of this folder: timm.create_model("local-dir:PATH/TO/FOLDER", pretrained=True)',
            "config = timm.data.resolve_model_data_config(model)  # input_size, mean, std, interpolation, crop_pct",
            "```", "",
            f"`hf-hub:{repo}` loads from the Hugging Face cache when `HF_HUB_OFFLINE=1`; in a mutualkd recipe the same"
            f' string is a weights source (`weights = "hf-hub:{repo}"`, or a teacher).'
            + ("" if repo_id else " `ORG/NAME` is the Hub repository this folder is uploaded to."), ""]

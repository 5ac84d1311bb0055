"""A peer of a saved mutualkd run, rebuilt and loaded: the one loader for a run's peer.

The engine (a ``[[peers]]`` table or a teacher naming a run) and ``mutualkd analyze`` (the
student and teacher it compares) both load through :func:`load_run_peer`, so the checks are
the same everywhere: the peer exists, its architecture is the one expected, the checkpoint
loads under the unpickling policy (:mod:`mutualkd.trust`), its classes fit the data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mutualkd import checkpoint as ckpt
from mutualkd.errors import CheckpointError, unknown_name_hint
from mutualkd.trust import UnsafeFileError
from mutualkd.weights._fit import as_tuple, load_into
from mutualkd.weights._source import Network, Source

__all__ = ["load_run_peer"]


def load_run_peer(path: str | Path, peer: str | int = 0, *, num_classes: int, in_chans: int, model: str | None = None,
                  kwargs: dict[str, Any] | None = None, reset_head: bool = False, where: str | None = None,
                  file: str = "<recipe>", model_field: str = "peers", arch_where: str | None = None,
                  text: str | None = None) -> Network:
    """Peer ``peer`` (name or index) of the run or checkpoint folder ``path``, built and loaded.

    ``model``: the architecture expected (None: the peer's own). ``kwargs``: timm.create_model's
    (None: the run's own). ``reset_head``: a new classifier instead of the saved one (else the
    run's classes must be the data set's). Messages name ``where`` (the source's field),
    ``arch_where`` (the architecture's) and ``file [model_field]`` (building the model).
    ``text``: the source as the recipe wrote it. Raises a CheckpointError for anything that
    does not fit, an UnsafeFileError for a checkpoint that asks to run code.
    """
    from mutualkd.peers import create_peer  # timm: imported when a network is built

    folder = ckpt.resolve_checkpoint(Path(path), where=where)
    meta = ckpt.read_meta(folder)
    peers: dict[str, Any] = meta.get("peers", {})
    names = list(peers)
    name = names[peer] if isinstance(peer, int) and 0 <= peer < len(names) else str(peer)
    if name not in peers:
        raise CheckpointError(f"the run in {folder} has no peer {peer!r}", where=where,
                              hint=unknown_name_hint("peer", str(peer), names))
    spec = peers[name]
    arch = spec["model"]
    if model is not None and model != arch:
        raise CheckpointError(f"peer '{name}' of {folder} is a '{arch}', the recipe expects a '{model}'",
                              where=arch_where or where, hint=f"name \"{arch}\" there, or name another run or peer")
    try:
        state = ckpt.load_checkpoint(folder)
    except UnsafeFileError as e:
        e.where = e.where or where  # the message names the file; where names the recipe key
        raise
    weights = ckpt.peer_weights(state, spec, name)
    if not isinstance(weights, dict):
        raise CheckpointError(f"the checkpoint {folder} holds no weights for peer '{name}'", where=where,
                              hint="name another checkpoint of the run")
    net = create_peer(arch, num_classes=num_classes, in_chans=in_chans,
                      kwargs=spec.get("kwargs", {}) if kwargs is None else kwargs, file=file, field=model_field)
    out = Network(net, arch, Source("run", f"{folder} (peer {name})", str(path) if text is None else text))
    out.mean, out.std = as_tuple(spec.get("mean")), as_tuple(spec.get("std"))  # a peer that had its own normalisation
    ds = meta.get("dataset", {})
    if ds.get("num_classes") != num_classes and not reset_head:
        raise CheckpointError(
            f"peer '{name}' of {folder} was trained on {ds.get('name')} with {ds.get('num_classes')} classes; this"
            f" recipe's data set has {num_classes} classes", where=where,
            hint="use a teacher trained on the same classes, or reset_head = true for a new, untrained classifier",
        )
    if out.mean is None and ds.get("mean") and ds.get("std"):
        out.mean, out.std = as_tuple(ds.get("mean")), as_tuple(ds.get("std"))
    load_into(out, weights, reset_head=reset_head, where=where or str(folder), trained_on=ds.get("name"))
    return out

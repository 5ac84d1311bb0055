"""The weights dispatcher, the top of :mod:`mutualkd.weights`: one call builds any network with its weights.

:func:`load_network` parses the source (:mod:`~mutualkd.weights._source`) and hands it to its
loader: a run's peer (:mod:`~mutualkd.weights._run`), a weights file fitted here
(:mod:`~mutualkd.weights._fit`), or timm's own loading for tags, hub repositories and model
folders (:mod:`~mutualkd.weights._hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mutualkd.errors import UserError
from mutualkd.weights._fit import finite, load_into, read_weights_file
from mutualkd.weights._hub import default_tag, load as load_pretrained
from mutualkd.weights._run import load_run_peer
from mutualkd.weights._source import Network, Source, parse_source

__all__ = ["load_network", "peer_network", "announce"]


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
    from mutualkd.peers import create_peer  # timm: imported when a network is built

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
        src = Source("timm", default_tag(model, where), f"pretrained = true ({model})")
    else:
        src = parse_source(source, where=where)
    if peer not in (None, 0) and src.kind != "run":  # 0: the default of a teacher_peer
        raise UserError(f"a peer ({peer!r}) is named, but {src.describe()} is not a mutualkd run", where=where,
                        hint="leave the peer out, or name a run folder")
    if src.kind == "run":
        return finite(load_run_peer(src.location, 0 if peer is None else peer, num_classes=num_classes,
                                    in_chans=in_chans, model=model, kwargs=kwargs, reset_head=reset_head, where=where,
                                    file=file, model_field=model_field, arch_where=arch_where, text=src.text), where)
    if src.kind == "file":
        if model is None:
            raise UserError(f"{src.location} is a bare weights file, which does not say which architecture it is",
                            where=where, hint="name the timm architecture it was saved from (teacher_model = \"resnet18\")")
        state = read_weights_file(Path(src.location), where=where)
        net = create_peer(model, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs, file=file, field=model_field)
        out = Network(net, model, src)
        load_into(out, state, reset_head=reset_head, where=where)
        return finite(out, where)
    return finite(load_pretrained(src, model, num_classes, in_chans, kwargs, reset_head, where, arch_where), where)


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

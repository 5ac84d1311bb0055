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

The package, bottom to top (each module imports only those above it in this list):
``_source`` (the shared types, the parser, the download switches), ``_fit`` (reading a weights
file, fitting weights to a model), ``_hub`` (timm's pretrained weights, hf-hub repositories,
model folders; :mod:`mutualkd.pretrained` re-exports it), ``_run`` (a saved run's peer, for
the engine and ``mutualkd analyze`` alike) and ``_builder`` (:func:`load_network`).
"""

from __future__ import annotations

from mutualkd.weights._builder import announce, load_network, peer_network
from mutualkd.weights._fit import classifier_names, load_into, read_weights_file
from mutualkd.weights._run import load_run_peer
from mutualkd.weights._source import (
    ALLOW_DOWNLOAD_ENV,
    OFFLINE_ENV,
    WEIGHT_SUFFIXES,
    Network,
    Source,
    downloads_allowed,
    hub_cache,
    hub_offline,
    parse_source,
)

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "OFFLINE_ENV",
    "WEIGHT_SUFFIXES",
    "Source",
    "Network",
    "parse_source",
    "load_network",
    "load_run_peer",
    "peer_network",
    "announce",
    "downloads_allowed",
    "hub_offline",
    "hub_cache",
    "read_weights_file",
    "load_into",
    "classifier_names",
]

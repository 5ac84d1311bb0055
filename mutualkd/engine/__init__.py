"""The engine: runs a strategy's schedule of steps over N peers.

Modules, in the order a run uses them:

* :mod:`.process` -- the Accelerator (processes, devices, DDP, trackers), seeds and determinism;
* :mod:`.launcher` -- what ``accelerate launch`` asked for: precision, compilation, refused backends;
* :mod:`.build` -- recipe -> strategy, data, peers, auxiliary modules, units, optimizers (writes nothing);
* :mod:`.state` -- the run folder, resume checks, the position in training;
* :mod:`.precision` -- autocast, loss scaling, backward and optimizer steps;
* :mod:`.step` -- one batch: the forward cache, the summed terms, one backward path;
* :mod:`.evaluate` -- top-1 / top-5 of the peers and their ensemble;
* :mod:`.snapshot` -- the trainer's state in and out of checkpoints, their metadata, the run summary;
* :mod:`.signals` -- SIGINT / SIGTERM as a request to stop after the batch;
* :mod:`.hooks` -- the callback protocol and the engine's own logging, progress and checkpoints;
* :mod:`.tracking`, :mod:`.ema` -- experiment trackers and EMA peers, as callbacks;
* :mod:`.trainer` -- the Trainer and its fit loop.
"""

from mutualkd.engine.build import Unit, check_recipe, resolve_strategy
from mutualkd.engine.hooks import Callback
from mutualkd.engine.precision import Precision
from mutualkd.engine.state import History, Position, resume_folder
from mutualkd.engine.step import StepResult
from mutualkd.engine.signals import RunInterrupted
from mutualkd.engine.state import EpochClock
from mutualkd.engine.trainer import Trainer

__all__ = [
    "Trainer",
    "RunInterrupted",
    "Callback",
    "StepResult",
    "Precision",
    "Position",
    "History",
    "EpochClock",
    "Unit",
    "check_recipe",
    "resolve_strategy",
    "resume_folder",
]

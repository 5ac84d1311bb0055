"""The conformance kit: the properties every plugin must have, as checks for a plugin's own tests.

A plugin author calls these from pytest (they need nothing else)::

    from mutualkd.testing import check_metric, check_strategy

    def test_my_distance_conforms():
        check_metric(my_distance)

    def test_my_strategy_conforms(tmp_path):
        check_strategy(MyStrategy, params={"weight": 0.5}, tmp_path=tmp_path)

Each check raises :class:`AssertionError` naming the plugin, the property that failed and
the values that broke it. Every built-in strategy and metric passes them (see
``tests/test_plugin_kit.py``).

* :func:`check_metric` (:mod:`~mutualkd.testing.metric_kit`): a distance ``d(a, b)``
  between factor batches ``[B, ...]``.
* :func:`check_strategy` (:mod:`~mutualkd.testing.strategy_kit`): a tiny end-to-end
  training run of a strategy class on the digits data, with a checkpoint, a resume, and
  checks on every step's loss terms.
* :func:`make_teacher` (:mod:`~mutualkd.testing.strategy_kit`): a throwaway trained run to
  use as a teacher checkpoint.
* :func:`registered`: register an object in the plugin registry for the duration of a
  ``with`` block, so the engine (which only asks the registry by name) can run a class
  that is not installed through an entry point.
"""

from mutualkd.testing._registered import registered
from mutualkd.testing.metric_kit import check_metric
from mutualkd.testing.strategy_kit import check_strategy, make_teacher

__all__ = ["check_metric", "check_strategy", "registered", "make_teacher"]

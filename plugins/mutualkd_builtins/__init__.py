"""mutualkd's built-in plugins: strategies and distance metrics.

They are registered through the ``mutualkd.strategies`` and ``mutualkd.metrics``
entry-point groups in mutualkd's pyproject.toml, like any third-party plugin; the core
never imports this package by name.
"""

"""Adapters of :class:`i2x.Tracker` to training frameworks, one optional module each.

- :mod:`i2x.integrations.lightning`: ``TrackerCallback``, a PyTorch Lightning callback
  (``pip install i2x[lightning]``).

Importing this package imports no framework; each module imports its own when it is imported.
"""

"""One explicit training loop per family: ``sft``, ``po`` (offline preference optimisation), ``rm``, ``ppo``.

Shared pieces (run directory, checkpoints, logging, optimizer set-up, the data position) are plain functions
and small classes in :mod:`finegrain.trainers.loop`; there is no base trainer class.
"""

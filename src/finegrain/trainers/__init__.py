"""One training module per family: ``sft``, ``po`` (offline preference optimisation), ``rm``, ``ppo``.

Shared pieces (run directory, checkpoints, logging, optimizer set-up, the data position, and the loop of every
trainer, which each supply their step as a function) are plain functions and small classes in
:mod:`finegrain.trainers.loop`; there is no base trainer class.
"""

"""Training: the loop's plain functions, the trainer and its listeners, optimizers, TensorBoard.

* ``loop.py``         -- evaluate a split, predict a split, find misclassified images
* ``trainer.py``      -- :class:`Trainer` (checkpoints, resume, early stopping) and :class:`Listener`
* ``optim.py``        -- optimizers (weight decay groups) and learning-rate schedules
* ``regularize.py``   -- MixUp / CutMix batches and the exponential moving average of the weights
* ``tensorboard.py``  -- :class:`TensorBoardListener`, everything a run logs
"""

from cnnvis.training.trainer import Listener, Trainer, TrainState

__all__ = ["Listener", "TrainState", "Trainer"]

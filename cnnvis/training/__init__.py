"""Training: the loop's plain functions, the trainer and its listeners, optimizers, TensorBoard.

* ``loop.py``         -- evaluate a split, predict a split, find misclassified images
* ``trainer.py``      -- :class:`Trainer` (checkpoints, resume, early stopping, the test pass)
* ``events.py``       -- :class:`TrainState` and :class:`Listener`: what the trainer tells listeners
* ``optim.py``        -- optimizers (weight decay groups) and learning-rate schedules
* ``regularize.py``   -- MixUp / CutMix batches and the exponential moving average of the weights
* ``tensorboard.py``  -- :class:`TensorBoardListener`, everything a run logs
* ``distributed.py``  -- several processes (torchrun): process group, sharding, reductions, launch
"""

from cnnvis.training.events import Listener, TrainState
from cnnvis.training.trainer import Trainer

__all__ = ["Listener", "TrainState", "Trainer"]

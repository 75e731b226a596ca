"""The trainer: optimiser and schedule (:mod:`.optim`), checkpoints (:mod:`.checkpointing`),
process groups (:mod:`.distributed`) and the loop (:mod:`.loop`). ``train.py`` is its app."""
from click4caption.training.loop import Trainer, TrainResult, run_training

__all__ = ["TrainResult", "Trainer", "run_training"]

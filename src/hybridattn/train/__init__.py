"""Training: the loop (:mod:`.trainer`), atomic checkpoints (:mod:`.checkpoint`), data parallelism
(:mod:`.distributed`) and the arena that compares mechanisms (:mod:`.arena`)."""

from hybridattn.train.checkpoint import load_checkpoint, save_checkpoint
from hybridattn.train.distributed import DistInfo, init_distributed
from hybridattn.train.trainer import TrainConfig, Trainer, TrainResult, evaluate, lr_at

__all__ = ["TrainConfig", "Trainer", "TrainResult", "evaluate", "lr_at", "save_checkpoint", "load_checkpoint",
           "DistInfo", "init_distributed"]

"""AdapMTL training: config, trainer (AdapMTL, ablations and baselines), checkpoints, logs, plots."""
from adapmtl.train.checkpoint import TrainedModel, load_checkpoint_file, load_trained
from adapmtl.train.config import Config, config_from_dict, load_config
from adapmtl.train.loss_weights import AdaptiveLossWeights
from adapmtl.train.run_guard import RunLockedError, TrainingInterrupted
from adapmtl.train.trainer import Trainer, batch_indices, seed_everything

__all__ = ["AdaptiveLossWeights", "Config", "RunLockedError", "TrainedModel", "Trainer", "TrainingInterrupted", "batch_indices", "config_from_dict",
           "load_checkpoint_file", "load_config", "load_trained", "seed_everything"]

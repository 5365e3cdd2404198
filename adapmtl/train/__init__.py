"""AdapMTL training: config, trainer (AdapMTL, ablations and baselines), checkpoints, logs, plots."""
from adapmtl.train.config import Config, config_from_dict, load_config
from adapmtl.train.loss_weights import AdaptiveLossWeights
from adapmtl.train.trainer import Trainer, batch_indices, seed_everything

__all__ = ["AdaptiveLossWeights", "Config", "Trainer", "batch_indices", "config_from_dict", "load_config",
           "seed_everything"]

"""The training layer: Trainer optimises a memory (or a bank's slots) with the
host LLM frozen, on batches from any pure function of (step, rank), with
exact resume and DDP; append_recipe holds the append rule's two-stage recipe.
It knows nothing of any benchmark: the recall app supplies the batches."""
from memkernels.train.append_recipe import (PRETRAINED_LR_SCALES, append_joint_config,
                                            pretrain_address)
from memkernels.train.trainer import Batch, TrainConfig, Trainer, trainer_rank

__all__ = ["Batch", "TrainConfig", "Trainer", "trainer_rank", "pretrain_address",
           "append_joint_config", "PRETRAINED_LR_SCALES"]

"""Training: the one loop (`train_epochs`; `fit` for adaptation), losses, patch sampling and
torch DDP (`distributed_context`)."""


from fseft.training.distributed import DistributedContext, distributed_context
from fseft.training.fit import FitSettings, TrainResult, fit, make_optimizer, supervised_loss, train_epochs
from fseft.training.losses import masked_class_losses, partial_label_loss, per_class_bce_dice
from fseft.training.sampling import EpochPatchDataset, patch_transforms, sample_patch_slices

__all__ = ["DistributedContext", "EpochPatchDataset", "FitSettings", "TrainResult", "distributed_context", "fit", "make_optimizer", "masked_class_losses", "partial_label_loss", "patch_transforms", "per_class_bce_dice", "sample_patch_slices", "supervised_loss", "train_epochs"]

"""Recovery after clustering: finetune (frozen / centroids / progressive), distillation, BN recalibration,
output-aware refit, output sensitivity and per-layer k under a budget, checkpoints, CIFAR augmentation,
torch.distributed helpers, curves."""
from .augment import cifar_augment
from .bn import recalibrate_bn
from .calibrate import calibrate_outputs
from .distill import distillation_loss
from .sensitivity import allocate_ks, output_sensitivity, sensitivity_plan
from .finetune import DEFAULT_EPOCHS, DEFAULT_LR, MODES, FinetuneResult, finetune, lr_factor

__all__ = ["finetune", "FinetuneResult", "MODES", "DEFAULT_EPOCHS", "DEFAULT_LR", "lr_factor", "cifar_augment",
           "recalibrate_bn", "calibrate_outputs", "distillation_loss", "output_sensitivity", "allocate_ks",
           "sensitivity_plan"]

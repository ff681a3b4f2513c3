"""Evaluation: top-1/top-5, per-class accuracy, confusion matrix (PNG), with a progress bar; accuracy under
FGSM/PGD attacks (:mod:`.robustness`)."""
from .metrics import EvalResult, confusion_png, evaluate, top1_accuracy
from .robustness import ATTACKS, RobustResult, adversarial_accuracy, adversarial_examples

__all__ = ["EvalResult", "evaluate", "top1_accuracy", "confusion_png", "ATTACKS", "RobustResult",
           "adversarial_accuracy", "adversarial_examples"]

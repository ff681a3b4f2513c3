"""Evaluation: top-1/top-5, per-class accuracy, confusion matrix (PNG), with a progress bar."""
from .metrics import EvalResult, confusion_png, evaluate, top1_accuracy

__all__ = ["EvalResult", "evaluate", "top1_accuracy", "confusion_png"]

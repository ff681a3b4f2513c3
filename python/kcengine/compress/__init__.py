"""Compression by weight clustering: plans, granularities, options, reports, sensitivity sweeps."""
from .apply import compress, conv_layers, elbow_index
from .layers import GRANULARITIES, ElementClusteredConv2d, LayerProblem, effective_weight
from .plan import (ByChannels, Elbow, FixedRatio, InertiaLimit, OutputSensitivity, PerLayer, k_from_value,
                   parse_plan, select_layers)
from .report import CompressionReport, LayerReport
from .sensitivity import SensitivityResult, local_maxima, sensitivity_sweep

__all__ = ["compress", "conv_layers", "elbow_index", "GRANULARITIES", "ElementClusteredConv2d", "LayerProblem",
           "effective_weight", "FixedRatio", "InertiaLimit", "Elbow", "PerLayer", "ByChannels", "OutputSensitivity",
           "parse_plan", "k_from_value", "select_layers", "CompressionReport", "LayerReport", "SensitivityResult",
           "sensitivity_sweep", "local_maxima"]

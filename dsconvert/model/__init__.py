"""Pure-torch, layer-streamed DeepSeek V2/V3 reference forward and logit metrics."""

from dsconvert.model.config import ModelConfig, RopeScaling, softmax_scale, yarn_get_mscale
from dsconvert.model.forward import ForwardOutput, ReferenceModel
from dsconvert.model.metrics import compare_logits, layer_errors, nonfinite_summary
from dsconvert.model.moe import route
from dsconvert.model.source import DictWeightSource, WeightSource

__all__ = [
    "DictWeightSource",
    "ForwardOutput",
    "ModelConfig",
    "ReferenceModel",
    "RopeScaling",
    "WeightSource",
    "compare_logits",
    "layer_errors",
    "nonfinite_summary",
    "route",
    "softmax_scale",
    "yarn_get_mscale",
]

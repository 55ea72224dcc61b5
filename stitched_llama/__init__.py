"""stitched_llama: a palette of models stitched between two LLaMA-family anchors (ESTA, CVPR 2024)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_stitched_llama import StitchCost, StitchedLlamaConfig, default_stitches
from .modeling_stitched_llama import StitchedLlamaForCausalLM, StitchedLlamaPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(StitchedLlamaConfig.model_type, StitchedLlamaConfig)
AutoModelForCausalLM.register(StitchedLlamaConfig, StitchedLlamaForCausalLM)
# Saved folders then carry the modeling code and `auto_map`, so they load with trust_remote_code=True
# where this package is not installed.
StitchedLlamaConfig.register_for_auto_class()
StitchedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "StitchCost",
    "StitchedLlamaConfig",
    "StitchedLlamaForCausalLM",
    "StitchedLlamaPreTrainedModel",
    "default_stitches",
]

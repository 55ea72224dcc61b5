"""Parameter-efficient stitch tuning (PST, docs/training.md): frozen anchors, one shared LoRA, biases per stitch.

    palette = StitchedLlamaForCausalLM.from_anchors(small, large, calibration=texts)
    model = prepare_esta(palette, EstaConfig(r=8))      # a peft model: LoRA shared by every stitch
    ...train with StitchTrainer...
    palette = merge_esta(model)                          # LoRA folded into the anchors, biases kept

The LoRA on a layer is shared by every stitch that runs that layer, so merging it is valid for all stitches at
once. Stitch-specific biases are zero-initialised layers on the linears they bias (`StitchBias`, parameters
`q_proj.stitch_bias.<stitch>`); each is added only while its stitch runs, and they survive merging and
`save_pretrained`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from .configuration_stitched_llama import StitchedLlamaConfig
from .modeling_stitched_llama import StitchedLlamaForCausalLM, stitch_of_bias

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
METHODS = ("esta", "lora-no-bias", "snnet-full")
_EXTRA_WEIGHTS = "stitch_weights.safetensors"
_ADAPTER_INFO = "stitched_adapter.json"


@dataclass
class EstaConfig:
    """How a palette is made trainable. `method` picks ESTA or one of its baselines (docs/training.md)."""

    method: Literal["esta", "lora-no-bias", "snnet-full"] = field(
        default="esta",
        metadata={
            "help": "`esta`: shared LoRA + stitch-specific biases. `lora-no-bias`: shared LoRA only. "
            "`snnet-full`: SN-Net direct adaptation, every anchor and stitching-layer weight trainable."
        },
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION,
        metadata={"help": "Anchor linears that get LoRA and stitch biases; add MLP names to adapt the MLPs too."},
    )
    stitch_layers: bool = field(
        default=True, metadata={"help": "Also put LoRA and stitch biases on the stitching layers."}
    )
    train_stitch_layers: bool = field(
        default=False,
        metadata={
            "help": "Train the stitching layers' own weight and bias, as SN-Net does, instead of a LoRA on them. "
            "They are small (d_small x d_large each) and sit where the stitch loses most."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: use one of {', '.join(METHODS)}.")
        if self.r < 1:
            raise ValueError(f"LoRA rank r={self.r} must be at least 1.")
        unknown = set(self.target_modules) - set(ATTENTION + MLP)
        if unknown:
            raise ValueError(f"Unknown target modules {sorted(unknown)}: choose among {', '.join(ATTENTION + MLP)}.")


def prepare_esta(palette: StitchedLlamaForCausalLM, config: EstaConfig | None = None) -> nn.Module:
    """Freeze the anchors and add the trainable parts of `config.method`; returns the model to train.

    For `esta` and `lora-no-bias` that is a `peft.PeftModel` around the palette; for `snnet-full` the palette.
    """
    config = config or EstaConfig()
    if not isinstance(palette, StitchedLlamaForCausalLM):
        raise TypeError(f"prepare_esta needs a StitchedLlamaForCausalLM, got {type(palette).__name__}.")
    palette.requires_grad_(False)
    palette.esta_method = config.method
    if config.method == "snnet-full":
        palette.small.requires_grad_(True)
        palette.large.requires_grad_(True)
        palette.stitch_layers.requires_grad_(True)
        return palette

    if config.method == "esta":
        palette.add_stitch_biases([*config.target_modules, *(["stitch_layers"] if config.stitch_layers else [])])
    names = "|".join(config.target_modules)
    pattern = rf"(small|large)\.model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    if config.stitch_layers and not config.train_stitch_layers and len(palette.stitch_layers):
        pattern += r"|stitch_layers\.[0-9_]+"
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(palette, lora)
    if config.train_stitch_layers:
        palette.stitch_layers.requires_grad_(True)  # their weights and biases: no LoRA was put on them
    _stitch_biases_trainable(palette, True)  # peft froze everything but LoRA
    return model


def _stitch_biases_trainable(palette: StitchedLlamaForCausalLM, trainable: bool) -> None:
    for _, module in palette.named_stitch_bias_modules():
        module.requires_grad_(trainable)


def unwrap_palette(model: nn.Module) -> StitchedLlamaForCausalLM:
    """The palette inside a peft model (or the palette itself)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not isinstance(model, StitchedLlamaForCausalLM):
        raise TypeError(f"Expected a palette or a peft model around one, got {type(model).__name__}.")
    return model


def _palette_name(name: str) -> str:
    """A parameter name as the palette sees it, without peft's wrapper prefixes."""
    return name.removeprefix("base_model.model.")


def trainable_parameters(model: nn.Module) -> dict:
    """Trainable parameters in total and per stitch (those a stitch runs), next to the palette's total."""
    palette = unwrap_palette(model)
    trainable = {
        _palette_name(n): p.numel() for n, p in model.named_parameters(remove_duplicate=True) if p.requires_grad
    }
    total = sum(p.numel() for p in model.parameters())
    per_stitch = []
    for k in range(palette.num_stitches):
        prefixes = tuple(p + "." for p in palette.stitch_module_prefixes(k))
        per_stitch.append(sum(v for n, v in trainable.items() if palette.runs_parameter(n, k, prefixes)))
    return {
        "total": total,
        "trainable": sum(trainable.values()),
        "trainable_percent": 100.0 * sum(trainable.values()) / total,
        "per_stitch": per_stitch,
    }


def merge_esta(model: nn.Module) -> StitchedLlamaForCausalLM:
    """Fold the shared LoRA into the anchor and stitching-layer weights; stitch biases stay as they are."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return unwrap_palette(model)


def save_esta_adapter(model: PeftModel, save_directory: str | os.PathLike) -> None:
    """Save only what the palette adds to the anchors: LoRA, stitching layers, first-token states, stitch biases
    and config.

    The anchors are referenced by name (`small_name_or_path` / `large_name_or_path` of the anchors' configs),
    so a Hub upload stays small; `load_esta_adapter` rebuilds the palette on top of them.
    """
    palette = unwrap_palette(model)
    os.makedirs(save_directory, exist_ok=True)
    model.save_pretrained(save_directory)
    own = ("stitch_layers.", "first_token_states.")
    state = {
        n: t.detach().contiguous()
        for n, t in palette.state_dict().items()
        if n.startswith(own) or stitch_of_bias(n) is not None
    }
    # peft's LoRA wrappers rename the stitching layer weights; store them under the palette's plain names.
    state = {n.replace(".base_layer", ""): t for n, t in state.items() if "lora_" not in n}
    save_file(state, os.path.join(save_directory, _EXTRA_WEIGHTS))
    palette.config.save_pretrained(save_directory)
    info = {"small": palette.small.config.name_or_path, "large": palette.large.config.name_or_path}
    # Whether the stitching layers' own weights train (`train_stitch_layers`), so that a trainable reload does too.
    # A LoRA-wrapped layer's `.weight` is its frozen base layer's.
    info["train_stitch_layers"] = any(layer.weight.requires_grad for layer in palette.stitch_layers.values())
    with open(os.path.join(save_directory, _ADAPTER_INFO), "w") as f:
        json.dump(info, f, indent=2)


def load_esta_adapter(
    directory: str | os.PathLike,
    small: nn.Module | str | None = None,
    large: nn.Module | str | None = None,
    is_trainable: bool = False,
    **kwargs,
) -> PeftModel:
    """Rebuild a palette from its anchors and an adapter folder written by `save_esta_adapter`.

    `small`/`large` default to the anchor names recorded at save time; `kwargs` go to `from_pretrained`.
    """
    config = StitchedLlamaConfig.from_pretrained(directory)
    with open(os.path.join(directory, _ADAPTER_INFO)) as f:
        info = json.load(f)
    anchors = []
    for given, name in ((small, info["small"]), (large, info["large"])):
        if given is None and not name:
            raise ValueError(f"{directory} does not record where its anchors come from: pass `small=` and `large=`.")
        given = given if given is not None else name
        anchors.append(given if isinstance(given, nn.Module) else AutoModelForCausalLM.from_pretrained(given, **kwargs))
    palette = StitchedLlamaForCausalLM(config, small=anchors[0], large=anchors[1])
    reference = anchors[1].get_input_embeddings().weight
    extra = load_file(os.path.join(directory, _EXTRA_WEIGHTS))
    missing = palette.load_state_dict(extra, strict=False).unexpected_keys
    if missing:
        raise ValueError(f"{directory}/{_EXTRA_WEIGHTS} holds weights this palette does not have: {missing[:5]}")
    palette.stitch_layers.to(device=reference.device, dtype=reference.dtype)
    palette.first_token_states.to(device=reference.device, dtype=reference.dtype)
    for _, module in palette.named_stitch_bias_modules():
        module.to(device=reference.device)
    palette.requires_grad_(False)
    model = PeftModel.from_pretrained(palette, directory, is_trainable=is_trainable)
    if is_trainable and info.get("train_stitch_layers", False):
        palette.stitch_layers.requires_grad_(True)
    _stitch_biases_trainable(palette, is_trainable)
    return model


@torch.no_grad()
def stitch_bias_norms(model: nn.Module) -> list[float]:
    """L2 norm of each stitch's biases: how far training moved them from zero."""
    palette = unwrap_palette(model)
    norms = []
    for k in range(palette.num_stitches):
        biases = palette.stitch_bias_parameters(k).values()
        norms.append(float(sum(float(p.square().sum()) for p in biases) ** 0.5))
    return norms


__all__ = [
    "EstaConfig",
    "load_esta_adapter",
    "merge_esta",
    "prepare_esta",
    "save_esta_adapter",
    "stitch_bias_norms",
    "trainable_parameters",
    "unwrap_palette",
]

"""Export one stitch of a palette as a slim checkpoint that holds only the weights that stitch runs.

- An anchor stitch becomes a plain `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` checkpoint
  (loads without this package) when its stitch biases fit the architecture's own bias slots.
- A hybrid stitch (or an anchor whose biases do not fit, e.g. Qwen2's `o_proj`) becomes a slim palette: a
  `StitchedLlamaForCausalLM` whose anchors keep only the layers the stitch runs; its code travels with it, so
  it loads with `trust_remote_code=True` where this package is not installed.

A shared LoRA still attached (peft) is merged into the exported copy of the weights. peft's layers are found by
their interface, so this file does not import peft.
"""

from __future__ import annotations

import copy
import os
import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .configuration_stitched_llama import StitchedLlamaConfig
from .modeling_stitched_llama import stitch_of_bias

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _bias_slots(config) -> tuple[set[str], dict]:
    """Linears of an anchor that can carry a bias, and the config changes that give them one."""
    if config.model_type == "qwen2":
        return {"q_proj", "k_proj", "v_proj"}, {}
    if config.model_type == "llama":
        return set(_ATTENTION + _MLP), {"attention_bias": True, "mlp_bias": True}
    return set(), {}


def _plain_state(palette: nn.Module) -> dict[str, torch.Tensor]:
    """The palette's weights under their plain names, with any shared LoRA merged into copies of them.

    peft's LoRA layers are found by their interface (this file may not import peft); the palette itself is
    left untouched, so exporting does not perturb its weights by a merge/unmerge round trip.
    """
    state = {}
    for name, tensor in palette.state_dict().items():
        if "lora_" not in name:
            state[name.replace(".base_layer", "")] = tensor
    for name, module in palette.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and not getattr(module, "merged", False):
            key = f"{name}.weight"
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            state[key] = state[key] + delta.to(state[key].dtype)
    return state


def _stitch_biases(palette: nn.Module, stitch: int) -> dict[str, torch.Tensor]:
    """{module name: bias} of a stitch's own biases that are not all zero."""
    biases = palette.stitch_bias_parameters(stitch).items()
    return {name: p.detach() for name, p in biases if bool(p.detach().abs().sum() > 0)}


@torch.no_grad()
def export_stitch(palette: nn.Module, stitch: int, save_directory: str | os.PathLike, **save_kwargs) -> str:
    """Write stitch `stitch` of `palette` to `save_directory`; returns the class name of the export."""
    stitch = palette.config.resolve_stitch(stitch)
    state = _plain_state(palette)
    biases = _stitch_biases(palette, stitch)
    n, j, _ = palette.config.stitch_parts(stitch)
    anchor = {palette.config.small_stitch: "small", palette.config.large_stitch: "large"}.get((n, j))
    # The large anchor with a block skipped exports as a plain model of the layers it keeps.
    layers = {old: new for new, old in enumerate(palette._segments(stitch)[1][-1][1])}
    model = _plain_anchor(palette, anchor, state, biases, layers) if anchor is not None else None
    if model is None:
        model = _slim_palette(palette, stitch, state)
    tokenizer = getattr(palette, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    model.generation_config = copy.deepcopy(palette.generation_config)
    model.save_pretrained(save_directory, **save_kwargs)
    return type(model).__name__


def _plain_anchor(
    palette: nn.Module, anchor: str, state: dict, biases: dict, layers: dict[int, int]
) -> nn.Module | None:
    """`layers` maps each kept layer index of the anchor to its index in the export."""
    source = getattr(palette, anchor)
    config = copy.deepcopy(source.config)
    _keep_layers(config, sorted(layers))
    slots, flags = _bias_slots(config)
    names = {_renumber(name.removeprefix(f"{anchor}."), "", layers): bias for name, bias in biases.items()}
    if any(name.rsplit(".", 1)[-1] not in slots for name in names):
        return None  # some bias has no slot in the plain architecture: export as a slim palette instead
    for key, value in flags.items():
        uses = _ATTENTION if key == "attention_bias" else _MLP
        if any(name.rsplit(".", 1)[-1] in uses for name in names):
            setattr(config, key, value)
    config.architectures = None
    model = AutoModelForCausalLM.from_config(config, dtype=source.get_input_embeddings().weight.dtype)
    own = {
        _renumber(k.removeprefix(f"{anchor}."), "", layers): v
        for k, v in state.items()
        if k.startswith(f"{anchor}.") and stitch_of_bias(k) is None  # the stitch's biases are folded in below
    }
    own.pop(None, None)  # the weights of skipped layers
    target = model.state_dict()
    for name in target:
        if name.endswith(".bias") and name not in own:
            own[name] = torch.zeros_like(target[name])  # a slot opened by the config change above
    for name, bias in names.items():
        own[f"{name}.bias"] = own[f"{name}.bias"] + bias.to(own[f"{name}.bias"].dtype)
    if config.tie_word_embeddings:
        own.pop("lm_head.weight", None)
    model.load_state_dict(own, strict=not config.tie_word_embeddings)
    return model


def _slim_palette(palette: nn.Module, stitch: int, state: dict) -> nn.Module:
    config = palette.config
    n, j, _ = config.stitch_parts(stitch)
    small_config = copy.deepcopy(config.small_config)
    large_config = copy.deepcopy(config.large_config)
    is_anchor = (n, j) in (config.small_stitch, config.large_stitch)
    # The large layers the stitch runs, renumbered from 0 in the slim palette.
    runs = [layers for anchor, layers in palette._segments(stitch)[1] if anchor is palette.large]
    large_layers = {old: new for new, old in enumerate(runs[0])} if runs else {}
    if large_layers:
        _keep_layers(large_config, sorted(large_layers))
    if not is_anchor:
        _keep_layers(small_config, range(n))
        # The slim hybrid has no small head and no large embedding: nothing is tied any more.
        small_config.tie_word_embeddings = large_config.tie_word_embeddings = False
    slim_stitch = [n, j] if is_anchor else [n, 0]
    slim_config = StitchedLlamaConfig(
        small_config=small_config,
        large_config=large_config,
        stitches=[slim_stitch],
        slim=True,
        share_stitch_layers=True,
        stitch_bias_targets=config.stitch_bias_targets if palette.stitch_bias_parameters(stitch) else None,
        map_first_token=config.map_first_token and not is_anchor,
        attn_implementation=config._attn_implementation,
    )
    model = type(palette)(slim_config)
    old_key, new_key = config.stitch_layer_key(stitch), slim_config.stitch_layer_key(0)
    prefixes = tuple(p + "." for p in palette.stitch_module_prefixes(stitch))
    renamed = {}
    for name, tensor in state.items():
        if not palette.runs_parameter(name, stitch, prefixes):
            continue
        if large_layers:
            name = _renumber(name, "large.", large_layers)
            if name is None:
                continue  # a skipped layer
        if not is_anchor:
            if old_key is not None:
                name = name.replace(f"stitch_layers.{old_key}.", f"stitch_layers.{new_key}.")
            name = name.replace(f"first_token_states.{n}_{j}.", f"first_token_states.{n}_0.")
        name = re.sub(rf"\.stitch_bias\.{stitch}$", ".stitch_bias.0", name)  # the slim palette's only stitch
        renamed[name] = tensor
    if not is_anchor:
        # The large head was tied to the large embedding, which the slim hybrid does not keep.
        renamed.setdefault(
            "large.lm_head.weight", state.get("large.lm_head.weight", state["large.model.embed_tokens.weight"])
        )
    dtype = next(iter(renamed.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not _tied(model, m)]
    if missing or unexpected:
        raise RuntimeError(
            f"Slim export of stitch {stitch} is inconsistent: missing {missing}, unexpected {unexpected}."
        )
    model.tie_weights()
    model.stitch_report = _report_of(palette.stitch_report, stitch)
    return model


def _report_of(report: dict, stitch: int) -> dict:
    """The sections of a palette's `stitch_report` about `stitch`, as stitch 0 of its slim export."""
    slim = {}
    if str(stitch) in report.get("metrics", {}):
        slim["metrics"] = {"0": dict(report["metrics"][str(stitch)])}
    if len(report.get("importance", [])) > stitch:
        slim["importance"] = [report["importance"][stitch]]
    profile = report.get("profile", {})
    if str(stitch) in profile.get("stitches", {}):
        slim["profile"] = {**profile, "stitches": {"0": dict(profile["stitches"][str(stitch)])}}
    return slim


def _tied(model: nn.Module, name: str) -> bool:
    return name in getattr(model, "all_tied_weights_keys", {})


def _keep_layers(config, layers: list[int] | range) -> None:
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]


def _renumber(name: str, prefix: str, layers: dict[int, int]) -> str | None:
    """Renumber the layer index in a weight name under `prefix` ("large." or "" for a plain anchor) by `layers`
    (old index -> new); None for a layer not kept. Other names pass unchanged."""
    match = re.match(rf"^({re.escape(prefix + 'model.layers.')})(\d+)(?=\.|$)", name)
    if match is None:
        return name
    new = layers.get(int(match.group(2)))
    return None if new is None else f"{match.group(1)}{new}{name[match.end() :]}"

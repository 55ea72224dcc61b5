"""Choosing the stitches, loading the anchors, and rebuilding the `init` phase's palette for the later phases."""

from __future__ import annotations

import json
from typing import Any

import torch

from .settings import Run, Setting


def parse_stitches(spec: str | None) -> list[tuple[int, int]] | None:
    """`"n:j,n:j"` -> hybrid pairs; None or "auto" -> chosen by the setting; "all" -> the default palette."""
    if spec is None or spec == "auto":
        return None
    if spec == "all":
        return []
    pairs = []
    for item in spec.split(","):
        n, j = item.strip().split(":")
        pairs.append((int(n), int(j)))
    return pairs


def choose_stitches(small_cfg: Any, large_cfg: Any, num_hybrids: int | None) -> list[tuple[int, int]]:
    """Both anchors plus `num_hybrids` hybrids of the default palette at evenly spaced FLOPs (mid-quantiles)."""
    from stitched_llama import StitchedLlamaConfig

    config = StitchedLlamaConfig(small_config=small_cfg, large_config=large_cfg)
    stitches = [tuple(s) for s in config.stitches]
    if num_hybrids is None:
        return stitches
    hybrids = list(range(1, len(stitches) - 1))
    flops = {k: config.stitch_cost(k).flops_per_token for k in hybrids}
    lo, hi = min(flops.values()), max(flops.values())
    chosen: list[int] = []
    for i in range(num_hybrids):
        target = lo + (i + 0.5) / num_hybrids * (hi - lo)
        k = min((k for k in hybrids if k not in chosen), key=lambda k: abs(flops[k] - target))
        chosen.append(k)
    return [stitches[0], *(stitches[k] for k in sorted(chosen)), stitches[-1]]


def anchor_kwargs(setting: Setting) -> dict:
    """`from_pretrained` keywords: fp32 weights (autocast does the rest), placed on the setting's device."""
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if setting.device != "cpu":
        kwargs["device_map"] = setting.device
    return kwargs


def hybrid_stitches(palette: Any) -> list[int]:
    """The stitches that go through a stitching layer."""
    return [k for k in range(palette.num_stitches) if palette.config.stitch_layer_key(k) is not None]


def reload_palette(run: Run, init: dict) -> Any:
    """The LS-initialised palette of the `init` phase, rebuilt from the anchors and its saved stitching layers
    (and first-token states)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM

    small, large = (
        AutoModelForCausalLM.from_pretrained(path, **anchor_kwargs(run.setting))
        for path in (run.sources.small, run.sources.large)
    )
    attn = {small.config._attn_implementation, large.config._attn_implementation}
    config = StitchedLlamaConfig(
        small_config=small.config,
        large_config=large.config,
        stitches=[list(s) for s in init["stitches"]],
        map_first_token=init.get("map_first_token", False),
        attn_implementation=attn.pop() if len(attn) == 1 else None,
    )
    palette = StitchedLlamaForCausalLM(config, small=small, large=large)
    reference = large.get_input_embeddings().weight
    state = load_file(run.work / "stitching.safetensors")
    missing, unexpected = palette.load_state_dict(state, strict=False)
    if unexpected or any(m.startswith(("stitch_layers.", "first_token_states.")) for m in missing):
        raise RuntimeError(f"{run.work / 'stitching.safetensors'} does not fit this palette: rerun the init phase.")
    palette.stitch_layers.to(device=reference.device, dtype=reference.dtype)
    palette.first_token_states.to(device=reference.device, dtype=reference.dtype)
    return palette.eval()


def reloaded(run: Run) -> tuple[dict, Any, Any]:
    """`(init results, tokenizer, palette)` for a phase that starts from the `init` phase."""
    from transformers import AutoTokenizer

    init = json.loads((run.raw / "init.json").read_text())
    return init, AutoTokenizer.from_pretrained(run.sources.small), reload_palette(run, init)

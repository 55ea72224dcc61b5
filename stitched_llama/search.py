"""Choosing the stitch space by measurement, before any training (docs/concepts.md, "Choosing the stitches").

    blocks = layer_skip_blocks(large, calibration, tokenizer, block_sizes=(1, 2, 4))
    palette, table = search_palette(small, large, candidate_stitches(palette_config, blocks), calibration,
                                    heldout, num_budgets=4, tokenizer=tokenizer)

`layer_skip_blocks` picks, for each block size, the contiguous block of the large anchor's layers whose input
and output states are closest in angular distance on the calibration text (Gromov et al., 2024; ShortGPT's
block-influence score is the same measure for one layer). `search_palette` fits every candidate stitch by least
squares, measures each one's held-out loss with forward passes only, and rebuilds the palette over the best
stitch of each FLOPs budget. Nothing here is needed to run a saved palette, so it stays out of the remote code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .configuration_stitched_llama import StitchedLlamaConfig, default_stitches
from .evaluation import evaluate_palette
from .modeling_stitched_llama import StitchedLlamaForCausalLM
from .sampler import select_stitches_to_deploy
from .stitch_init import calibration_batches


@torch.no_grad()
def angular_distances(large: PreTrainedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`[L + 1, L + 1]`: mean angular distance (arccos of the cosine, over pi) between the states entering layers
    `a` and `b` of `large` (`b = L` is the last layer's output before the norm), over the real tokens but the first
    of each sequence, whose massive activations would dominate."""
    n_layers = large.config.num_hidden_layers
    device = large.get_input_embeddings().weight.device
    entering: list[torch.Tensor] = []  # per layer, [tokens, hidden], then the last layer's output
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, kwargs: entering.append(args[0]), with_kwargs=True)
        for layer in large.model.layers
    ]
    hooks.append(large.model.norm.register_forward_pre_hook(lambda module, args: entering.append(args[0])))
    totals, count = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64), 0
    try:
        for input_ids, attention_mask in batches:
            entering.clear()
            large(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            keep = attention_mask.to(device).bool().clone()
            keep[:, 0] = False
            states = torch.stack([h[keep].double() for h in entering])  # [L + 1, tokens, hidden]
            states = states / states.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            cosine = torch.einsum("atd,btd->abt", states, states).clamp(-1.0, 1.0)  # [L + 1, L + 1, tokens]
            totals += (torch.arccos(cosine) / math.pi).sum(dim=-1).cpu()
            count += states.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return totals / max(count, 1)


def layer_skip_blocks(
    large: PreTrainedModel,
    calibration: Any,
    tokenizer: Any = None,
    block_sizes: Sequence[int] = (1, 2, 4),
    *,
    start: int = 0,
    max_length: int = 512,
    batch_size: int = 8,
) -> list[tuple[int, int]]:
    """For each size `m`, the block `(a, a + m)` of `large`'s layers (`a >= start`) that changes the hidden state
    least, by angular distance on `calibration`. The last layer is never dropped."""
    n_layers = large.config.num_hidden_layers
    for m in block_sizes:
        if not 1 <= m <= n_layers - 1 - start:
            raise ValueError(
                f"Block size {m} cannot be skipped from a {n_layers}-layer anchor starting at layer {start}: "
                f"use sizes in 1..{n_layers - 1 - start} (the last layer is kept)."
            )
    batches = calibration_batches(
        calibration,
        tokenizer,
        vocab_size=large.config.vocab_size,
        min_tokens=1,
        max_length=max_length,
        batch_size=batch_size,
    )
    distance = angular_distances(large, batches)
    blocks = []
    for m in block_sizes:
        starts = range(start, n_layers - m)  # a + m <= L - 1: the last layer stays
        a = min(starts, key=lambda a: float(distance[a, a + m]))
        blocks.append((a, a + m))
    return blocks


def candidate_stitches(
    config: StitchedLlamaConfig,
    blocks: Sequence[tuple[int, int]] = (),
    spread: int = 1,
    every: int = 1,
) -> list[tuple[int, ...]]:
    """SN-Net's stitches (every `every`-th of them, for deep anchors whose full list would take long to measure),
    their neighbours `n +- spread`, the large anchor with each block of `blocks` skipped, and each hybrid that
    enters the large anchor before a block with that block skipped as well."""
    if every < 1 or spread < 0:
        raise ValueError(f"every={every} must be at least 1 and spread={spread} at least 0.")
    n_small, n_large = config.small_config.num_hidden_layers, config.large_config.num_hidden_layers
    pairs = set()
    for n, j in default_stitches(n_small, n_large)[1:-1][::every]:
        for dn in range(-spread, spread + 1):
            if 1 <= n + dn <= n_small:
                pairs.add((n + dn, j))
    stitches: set[tuple[int, ...]] = set(pairs)
    for a, b in blocks:
        stitches.add((0, 0, a, b))
        # a > j: a block skipped right at j would only be `(n, b)` with its stitching layer fitted to the wrong layer
        stitches.update((n, j, a, b) for n, j in pairs if j < a and b - a < n_large - j)
    return sorted(stitches)


def search_stitches(
    palette: StitchedLlamaForCausalLM,
    heldout: Any,
    num_budgets: int,
    **evaluate_kwargs: Any,
) -> tuple[list[int], list[dict[str, Any]]]:
    """The lowest held-out loss in each of `num_budgets` equal FLOPs intervals, plus both anchors, measured with
    forward passes only. Returns (stitch indices, the table of every stitch with its loss and whether it was kept).
    """
    if num_budgets < 1:
        raise ValueError(f"num_budgets={num_budgets} must be at least 1.")
    rows = evaluate_palette(palette, heldout, **evaluate_kwargs)
    flops = [row["flops_per_token"] for row in rows]
    chosen = select_stitches_to_deploy(flops, [-row["loss"] for row in rows], num_budgets)
    for row in rows:
        row["kept"] = row["stitch"] in chosen
    return chosen, rows


def search_palette(
    small: PreTrainedModel,
    large: PreTrainedModel,
    candidates: Sequence[Sequence[int]],
    calibration: Any,
    heldout: Any,
    num_budgets: int = 4,
    *,
    tokenizer: Any = None,
    evaluate_kwargs: dict[str, Any] | None = None,
    **from_anchors_kwargs: Any,
) -> tuple[StitchedLlamaForCausalLM, list[dict[str, Any]]]:
    """Fit every candidate stitch, keep the best per FLOPs budget on `heldout`, and return the palette of those
    (its stitching layers fitted again on `calibration`, so unshared layers come out exactly as measured) with the
    search's table. `from_anchors_kwargs` go to both builds (`share_stitch_layers` defaults to False here, so that
    each candidate is measured with the stitching layer it will keep)."""
    from_anchors_kwargs.setdefault("share_stitch_layers", False)
    wide = StitchedLlamaForCausalLM.from_anchors(
        small, large, stitches=candidates, calibration=calibration, tokenizer=tokenizer, **from_anchors_kwargs
    )
    chosen, rows = search_stitches(wide, heldout, num_budgets, **(evaluate_kwargs or {}))
    stitches = [wide.config.stitches[k] for k in chosen]
    palette = StitchedLlamaForCausalLM.from_anchors(
        small, large, stitches=stitches, calibration=calibration, tokenizer=tokenizer, **from_anchors_kwargs
    )
    return palette, rows


def format_search_table(rows: list[dict[str, Any]]) -> str:
    """The search's table as markdown: every candidate, its cost, held-out loss and whether it was kept."""
    lines = ["| stitch | kind | GFLOPs/token | held-out loss | kept |", "|---|---|---:|---:|:---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['flops_per_token'] / 1e9:.4f} | {r['loss']:.4f} | "
            f"{'yes' if r['kept'] else ''} |"
        )
    return "\n".join(lines)


__all__ = [
    "angular_distances",
    "candidate_stitches",
    "format_search_table",
    "layer_skip_blocks",
    "search_palette",
    "search_stitches",
]

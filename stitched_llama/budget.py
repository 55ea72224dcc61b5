"""Choosing a stitch under a budget: parameters, FLOPs, measured latency and memory.

Latency and memory come from `profile_stitches`, which measures them on the current device and stores them in the
palette's report (`palette.stitch_report["profile"]`, saved as `stitch_report.json`), so they travel with it.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.utils import logging

_UNITS = {
    "params": {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12},
    "flops": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
    "ms": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "mb": {"mb": 1.0, "mib": 1.048576, "gb": 1e3, "gib": 1073.741824, "kb": 1e-3},
}


def parse_budget(name: str, value: float | int | str | None, kind: str) -> float | None:
    """A budget as a number in the base unit of `kind`; strings may carry a unit ("1.5B", "20ms", "2GB")."""
    if value is None:
        return None
    units = _UNITS[kind]
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in units:
            accepted = ", ".join(u or "(none)" for u in units)
            raise ValueError(f"`{name}={value!r}` has an unknown unit: use a number or one of the units {accepted}.")
        number = float(match.group(1)) * units[unit]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"`{name}` must be a number or a string with a unit, got {type(value).__name__}.")
    if not number > 0:
        raise ValueError(f"`{name}={value!r}` must be positive.")
    return number


@torch.inference_mode()
def profile_stitches(
    palette: nn.Module,
    stitches: list[int] | None = None,
    batch_size: int = 1,
    prompt_length: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """Measure prefill time, per-token decode time and peak memory of each stitch on the palette's device.

    Times are medians over `repeats` runs after one warm-up. Memory is the peak allocated by the run on CUDA;
    on CPU, where allocations are not tracked, it is the bytes of the weights the stitch runs plus its KV cache
    at the end of the run. The result is stored in `palette.stitch_report["profile"]` and returned.
    """
    config = palette.config
    stitches = list(range(len(config.stitches))) if stitches is None else [config.resolve_stitch(k) for k in stitches]
    device = palette.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (batch_size, prompt_length), generator=generator).to(device)
    was_training = palette.training
    palette.eval()
    rows = {}
    try:
        for k in logging.tqdm(stitches, desc="Profiling stitches", unit="stitch"):
            prefill, decode, memory = [], [], []
            for run in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                cache = DynamicCache(config=config)  # filled in place, whatever the output calls it
                out = palette(prompt, cache=cache, stitch=k, use_cache=True, logits_to_keep=1)
                _sync(device)
                t_prefill = time.perf_counter() - start
                token = out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(new_tokens):
                    out = palette(token, cache=cache, stitch=k, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                _sync(device)
                t_decode = (time.perf_counter() - start) / new_tokens
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) - base + _weight_bytes(palette, k)
                else:
                    peak = _weight_bytes(palette, k) + _cache_bytes(cache)
                if run > 0:  # the first run warms up kernels and allocators
                    prefill.append(t_prefill)
                    decode.append(t_decode)
                    memory.append(peak)
            rows[str(k)] = {
                "prefill_ms": 1e3 * _median(prefill),
                "decode_ms_per_token": 1e3 * _median(decode),
                "memory_mb": max(memory) / 1e6,
            }
    finally:
        palette.train(was_training)
    profile = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(palette.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "stitches": {**palette.stitch_report.get("profile", {}).get("stitches", {}), **rows},
    }
    palette.update_stitch_report(profile=profile)
    return profile


def select_stitch(
    palette: nn.Module,
    max_params: float | str | None = None,
    max_flops: float | str | None = None,
    max_latency_ms: float | str | None = None,
    max_memory_mb: float | str | None = None,
) -> int:
    """The best stitch within every budget given.

    Best means the lowest eval loss when the palette's report holds eval metrics for every candidate, else the
    highest learned importance, else the highest cost (`palette.stitch_report`). Latency budgets apply to
    the per-token decode time and need `profile_stitches()` first.
    """
    config = palette.config
    budgets = {
        "params": parse_budget("max_params", max_params, "params"),
        "flops": parse_budget("max_flops", max_flops, "flops"),
        "latency": parse_budget("max_latency_ms", max_latency_ms, "ms"),
        "memory": parse_budget("max_memory_mb", max_memory_mb, "mb"),
    }
    report = palette.stitch_report
    profile = report.get("profile", {}).get("stitches", {})
    if (budgets["latency"] or budgets["memory"]) and not profile:
        raise ValueError("Latency and memory budgets need measurements: call `model.profile_stitches()` first.")

    def measures(k: int) -> dict[str, float]:
        cost = config.stitch_cost(k)
        row = profile.get(str(k), {})
        return {
            "params": cost.params,
            "flops": cost.flops_per_token,
            "latency": row.get("decode_ms_per_token", float("inf")),
            "memory": row.get("memory_mb", float("inf")),
        }

    candidates = [
        k
        for k in range(len(config.stitches))
        if all(limit is None or measures(k)[key] <= limit for key, limit in budgets.items())
    ]
    if not candidates:
        cheapest = min(range(len(config.stitches)), key=lambda k: config.stitch_cost(k).flops_per_token)
        m = measures(cheapest)
        raise ValueError(
            f"No stitch fits the budget. The cheapest, stitch {cheapest}, needs {m['params']:,} params and "
            f"{m['flops']:,} FLOPs/token"
            + (f", {m['latency']:.2f} ms/token and {m['memory']:.1f} MB" if str(cheapest) in profile else "")
            + "."
        )
    metrics, importance = report.get("metrics", {}), report.get("importance")
    if all("eval_loss" in metrics.get(str(k), {}) for k in candidates):
        return min(candidates, key=lambda k: metrics[str(k)]["eval_loss"])
    if importance:
        return max(candidates, key=lambda k: importance[k])
    return max(candidates, key=lambda k: config.stitch_cost(k).flops_per_token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _weight_bytes(palette: nn.Module, stitch: int) -> int:
    prefixes = tuple(p + "." for p in palette.stitch_module_prefixes(stitch))
    seen, total = set(), 0
    for name, p in palette.named_parameters(remove_duplicate=False):
        if palette.runs_parameter(name, stitch, prefixes) and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total

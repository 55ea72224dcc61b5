"""Stitch tables of two real anchor pairs, computed from their published configs (no weights, no Hub).

    python benchmarks/stitch_tables.py            # markdown tables, as pasted into docs/concepts.md
    python benchmarks/stitch_tables.py --no-meta-check

The configs below are the published `config.json` values of SmolLM2-135M / SmolLM2-360M and
Llama-2-7B / Llama-2-13B, written out as `LlamaConfig` kwargs. Costs come from
`StitchedLlamaConfig.stitch_cost(k)` alone. As an independent check, the script also builds each palette
on the `meta` device (shapes only, no memory) and counts the parameters under each stitch's module prefixes,
which must equal the config's count.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import torch
from transformers import LlamaConfig

from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM

# Published configs (HuggingFaceTB/SmolLM2-135M, -360M; meta-llama/Llama-2-7b-hf, -13b-hf).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
SMOLLM2_360M = dict(
    vocab_size=49152,
    hidden_size=960,
    intermediate_size=2560,
    num_hidden_layers=32,
    num_attention_heads=15,
    num_key_value_heads=5,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA2_13B = dict(
    vocab_size=32000,
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# name -> (small kwargs, large kwargs, published anchor sizes to check against, as (small, large) params)
PAIRS: dict[str, tuple[dict, dict, tuple[float, float]]] = {
    "SmolLM2-135M / SmolLM2-360M": (SMOLLM2_135M, SMOLLM2_360M, (134.5e6, 361.8e6)),
    "Llama-2-7B / Llama-2-13B": (LLAMA2_7B, LLAMA2_13B, (6.74e9, 13.0e9)),
}


def palette_config(small: dict, large: dict) -> StitchedLlamaConfig:
    return StitchedLlamaConfig(small_config=LlamaConfig(**small), large_config=LlamaConfig(**large))


def table_rows(config: StitchedLlamaConfig) -> list[dict]:
    """The rows of `StitchedLlamaForCausalLM.stitch_table()`, from the config alone (no model built)."""
    last = len(config.stitches) - 1
    large = config.stitch_cost(last)
    rows = []
    for k, (n, j) in enumerate(config.stitches):
        cost = config.stitch_cost(k)
        kind = "small anchor" if k == 0 else "large anchor" if k == last else "hybrid"
        rows.append(
            {
                "stitch": k,
                "n": n,
                "j": j,
                "kind": kind,
                "layers": config.num_layers(k),
                "params": cost.params,
                "flops_per_token": cost.flops_per_token,
                "params_pct": 100 * cost.params / large.params,
                "flops_pct": 100 * cost.flops_per_token / large.flops_per_token,
            }
        )
    return rows


def _params(x: int) -> str:
    return f"{x / 1e9:.3f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| stitch | (n, j) | kind | layers | params | GFLOPs/token | params % large | FLOPs % large |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stitch']} | ({r['n']}, {r['j']}) | {r['kind']} | {r['layers']} | {_params(r['params'])} | "
            f"{r['flops_per_token'] / 1e9:.3f} | {r['params_pct']:.1f}% | {r['flops_pct']:.1f}% |"
        )
    return "\n".join(lines)


def monotonicity(rows: list[dict], key: str) -> str:
    """Whether `key` never decreases from the small anchor (stitch 0) to the large one, and where it does."""
    drops = [(a["stitch"], b["stitch"]) for a, b in zip(rows, rows[1:]) if b[key] < a[key]]
    above_large = [r["stitch"] for r in rows[:-1] if r[key] > rows[-1][key]]
    if not drops and not above_large:
        return "non-decreasing from small to large, every hybrid below the large anchor"
    parts = []
    if drops:
        parts.append(f"{len(drops)} decrease(s) along the index ({', '.join(f'{a} -> {b}' for a, b in drops)})")
    if above_large:
        parts.append(f"{len(above_large)} hybrid(s) above the large anchor (stitches {above_large})")
    return "; ".join(parts)


def steps(rows: list[dict], key: str) -> str:
    """Sizes of the steps between neighbouring stitches, in % of the large anchor: how smooth the palette is."""
    gaps = [(b[f"{key}_pct"] - a[f"{key}_pct"], a["stitch"], b["stitch"]) for a, b in zip(rows, rows[1:])]
    sizes = sorted(g for g, _, _ in gaps)
    largest = max(gaps)
    return (
        f"steps between neighbours {sizes[0]:.1f} .. {sizes[-1]:.1f} points (median {sizes[len(sizes) // 2]:.1f}); "
        f"largest {largest[0]:.1f} between stitches {largest[1]} and {largest[2]}"
    )


def meta_check(config: StitchedLlamaConfig) -> None:
    """Count real parameter tensors per stitch on the meta device and compare with the config's count."""
    with torch.device("meta"):
        model = StitchedLlamaForCausalLM(config)
    for k in range(len(config.stitches)):
        seen: dict[int, int] = {}  # by storage identity, so tied embedding/head count once
        for prefix in model.stitch_module_prefixes(k):
            for p in model.get_submodule(prefix).parameters():
                seen[id(p)] = p.numel()
        counted, expected = sum(seen.values()), config.stitch_cost(k).params
        if counted != expected:
            raise AssertionError(
                f"stitch {k} {config.stitches[k]}: modules hold {counted} params, config says {expected}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-meta-check", action="store_true", help="skip the parameter count on the meta device")
    args = parser.parse_args()

    for name, (small, large, (small_size, large_size)) in PAIRS.items():
        config = palette_config(small, large)
        rows = table_rows(config)
        print(f"### {name}\n")
        print(markdown(rows))
        got_small, got_large = rows[0]["params"], rows[-1]["params"]
        print(
            f"\nAnchors: small {got_small:,} params (published ~{_params(int(small_size))}), "
            f"large {got_large:,} params (published ~{_params(int(large_size))})."
        )
        for label, got, want in (("small", got_small, small_size), ("large", got_large, large_size)):
            # The published sizes are rounded (13.0B, 6.74B, ...): accept 0.5%.
            if abs(got - want) > 0.005 * want:
                raise AssertionError(f"{name}: {label} anchor has {got:,} params, published ~{want:,.0f}")
        print(f"Params: {monotonicity(rows, 'params')}; {steps(rows, 'params')}.")
        print(f"FLOPs/token: {monotonicity(rows, 'flops_per_token')}; {steps(rows, 'flops')}.")
        if not args.no_meta_check:
            meta_check(config)
            print("Meta-device check: every stitch's parameter count equals the modules it runs.")
        print()


if __name__ == "__main__":
    main()

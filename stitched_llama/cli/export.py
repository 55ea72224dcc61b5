"""`stitched-llama export`: one stitch alone, as a plain anchor model or a slim palette, by index or by budget."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import (
    CliError,
    add_command,
    check_out_dir,
    device_option,
    human,
    human_bytes,
    load_palette,
    output_options,
    palette_argument,
    safetensors_bytes,
    stitch_index,
    stitch_label,
)

DESCRIPTION = """\
Export one stitch alone: only the weights it runs (LoRA merged, its biases folded in). An anchor
becomes a plain Llama/Mistral/Qwen2 model, a hybrid a slim palette. --stitch best picks the best stitch
within budgets (lowest eval loss when `evaluate --update-palette` stored metrics).

  stitched-llama export run/palette --stitch 3 --out stitch3
  stitched-llama export run/palette --stitch best --max-params 1.5B --max-latency-ms 20 --out slim"""
# (option, select_stitch keyword, budget kind of `budget.parse_budget`, metavar, help)
BUDGETS = (
    ("--max-params", "max_params", "params", "N", 'parameter budget for best, e.g. "1.5B", "350M"'),
    ("--max-flops", "max_flops", "flops", "N", 'forward FLOPs-per-token budget for best, e.g. "2G"'),
    (
        "--max-latency-ms",
        "max_latency_ms",
        "ms",
        "T",
        'per-token decode time budget for best, e.g. "20" or "20ms" (measured)',
    ),
    ("--max-memory-mb", "max_memory_mb", "mb", "M", 'memory budget for best, e.g. "800" or "2GB" (measured)'),
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parents = [
        palette_argument(),
        output_options("folder to write the export to"),
        device_option("device that latency/memory budgets are measured on (default: auto)"),
    ]
    p = add_command(subparsers, "export", run, DESCRIPTION, parents=parents)
    p.add_argument(
        "--stitch",
        required=True,
        metavar="K",
        help="stitch index (0 = small anchor, -1 = large), small, large, or best",
    )
    budgets = p.add_argument_group("budgets (with --stitch best)")
    for option, _, _, metavar, help in BUDGETS:
        budgets.add_argument(option, metavar=metavar, help=help)
    return p


def _parse_budgets(args: argparse.Namespace) -> dict[str, str]:
    """The budgets given, checked (units, sign) before anything heavy is loaded."""
    from ..budget import parse_budget

    budgets = {}
    for option, keyword, kind, _, _ in BUDGETS:
        value = getattr(args, keyword)
        if value is not None:
            if str(value).strip().startswith("-"):
                raise CliError(f"{option} {value!r} must be positive: a budget is an upper limit, e.g. {option} 1.5B")
            parse_budget(option, value, kind)  # raises ValueError naming the option, the value and the units
            budgets[keyword] = value
    return budgets


def run(args: argparse.Namespace) -> int:
    """Save one stitch alone: only the weights it runs, as a plain anchor model or a slim palette."""
    budgets = _parse_budgets(args)
    best = str(args.stitch).strip().lower() == "best"
    if budgets and not best:
        raise CliError(
            f"budgets ({', '.join(option for option, keyword, *_ in BUDGETS if keyword in budgets)}) apply only with --stitch best; "
            f"drop them or replace --stitch {args.stitch} with --stitch best"
        )
    if Path(args.out).resolve() == Path(args.palette_dir).resolve():
        raise CliError("--out is the palette folder itself: export to another folder")
    out = check_out_dir(args.out, args.overwrite)
    # Profiling (for latency and memory budgets) measures the device the palette runs on.
    palette = load_palette(args.palette_dir, device=args.device if best else None)
    if best:
        profiled = bool(palette.stitch_report.get("profile", {}).get("stitches"))
        if ("max_latency_ms" in budgets or "max_memory_mb" in budgets) and not profiled:
            print("measuring the latency and memory of every stitch on this machine (profile_stitches)...")
            palette.profile_stitches()
        k = palette.select_stitch(**budgets)
        ppl = palette.stitch_report.get("metrics", {}).get(str(k), {}).get("eval_perplexity")
        given = [(option, budgets[keyword]) for option, keyword, *_ in BUDGETS if keyword in budgets]
        within = ", ".join(f"{option} {value}" for option, value in given)
        print(
            f"best stitch within {within or 'no budget'}: {stitch_label(palette, k)}"
            + (f", eval perplexity {ppl:.4g}" if ppl is not None else "")
        )
    else:
        k = stitch_index(palette, args.stitch)
    cost = palette.config.stitch_cost(k)
    cls = palette.export_stitch(k, out)
    export_bytes, palette_bytes = safetensors_bytes(out), safetensors_bytes(args.palette_dir)
    print(f"exported {stitch_label(palette, k)} as {cls} to {out}")
    print(f"  {human(cost.params)} parameters, {human(cost.flops_per_token)} FLOPs/token")
    ratio = export_bytes / palette_bytes if palette_bytes else float("nan")
    print(
        f"size on disk (*.safetensors): export {human_bytes(export_bytes)}, palette {human_bytes(palette_bytes)} "
        f"(export = {ratio:.1%} of the palette)"
    )
    loader = "AutoModelForCausalLM.from_pretrained"
    remote = ", trust_remote_code=True" if cls.startswith("StitchedLlama") else ""
    print(f'load it with {loader}("{out}"{remote})')
    return 0

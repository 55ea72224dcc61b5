"""`stitched-llama evaluate`: loss and perplexity of each stitch next to its cost, tables and a Pareto plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import (
    CliError,
    add_command,
    context_limit,
    evaluation_data,
    load_palette,
    loading_options,
    output_options,
    palette_argument,
    stitch_index,
)

DESCRIPTION = """\
Evaluate stitches of a palette on held-out data: loss and perplexity next to parameters and FLOPs, the
Pareto front, written to --out as evaluation.md/.csv/.json and pareto.png.

  stitched-llama evaluate run/palette --data val.jsonl --out run/eval --update-palette"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parents = [
        palette_argument(),
        output_options("folder for the tables and the plot", overwrite=False),
        *loading_options(),
    ]
    p = add_command(subparsers, "evaluate", run, DESCRIPTION, parents=parents)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="instruction records (.jsonl/.json/.parquet, responses scored) or .txt (plain-text perplexity of "
        "every token, one paragraph per sequence)",
    )
    p.add_argument(
        "--stitches", default="all", help='stitches to evaluate: all (default), deployed, or indices like "0,3,5"'
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=1024, help="longest sequence, in tokens (default 1024)")
    p.add_argument("--max-records", type=int, metavar="N", help="evaluate only the first N records")
    p.add_argument(
        "--update-palette",
        action="store_true",
        help="store the metrics in the palette's report (stitch_report.json, replacing earlier metrics; "
        "`export --stitch best` then picks by eval loss) and rewrite its model card",
    )
    return p


def _stitch_selection(palette: Any, value: str) -> Any:
    if value in ("all", "deployed"):
        return value
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise CliError(f"--stitches {value!r} names no stitch: pass all, deployed or indices such as 0,3,5")
    return [stitch_index(palette, v) for v in items]


def run(args: argparse.Namespace) -> int:
    """Loss and perplexity of each stitch next to its cost: markdown/CSV/JSON tables and a Pareto plot."""
    from ..evaluation import REPORT_FILES, evaluate_palette, format_markdown
    from ..model_card import write_model_card
    from ..modeling_stitched_llama import REPORT_FILE, write_stitch_report

    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_records is not None and args.max_records < 1:
        raise CliError(f"--max-records {args.max_records} must be at least 1")
    palette = load_palette(
        args.palette_dir, tokenizer=args.tokenizer, need_tokenizer=True, dtype=args.dtype, device=args.device
    )
    stitches = _stitch_selection(palette, args.stitches)
    limit = context_limit(palette)
    dataset, collator, kind = evaluation_data(args.data, palette.tokenizer, limit, args.max_length, args.max_records)
    which = {"all": f"all {palette.num_stitches} stitches", "deployed": "the deployed stitches"}
    which = which[stitches] if isinstance(stitches, str) else f"stitches {stitches}"
    print(f"evaluating {which} on {len(dataset)} {kind}")
    rows = evaluate_palette(
        palette,
        dataset,
        stitches=stitches,
        batch_size=args.batch_size,
        output_dir=args.out,
        collator=collator,
        tokenizer=palette.tokenizer,
        max_length=min(args.max_length, limit),
    )
    print()
    print(format_markdown(rows))
    print()
    for key, name in REPORT_FILES.items():
        print(f"{'plot' if key == 'png' else key + ' table'}: {Path(args.out) / name}")
    if args.update_palette:
        # This evaluation replaces earlier metrics: mixing metrics from different data would mislead select_stitch.
        metrics = {str(r["stitch"]): {"eval_loss": r["loss"], "eval_perplexity": r["perplexity"]} for r in rows}
        palette.update_stitch_report(metrics=metrics)
        write_stitch_report(palette, args.palette_dir)  # the weights are unchanged: rewrite the report and card only
        write_model_card(palette, args.palette_dir)
        print(f"stitch metrics stored in {Path(args.palette_dir) / REPORT_FILE}")
    return 0

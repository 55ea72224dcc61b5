"""`stitched-llama build`: a palette between two anchors, its stitching layers fitted by least squares, saved."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from ._common import (
    CliError,
    add_command,
    check_out_dir,
    dtype_option,
    evaluation_data,
    human_bytes,
    one_line,
    output_options,
    read_data,
    safetensors_bytes,
    tokenizer_option,
    torch_dtype,
)

DESCRIPTION = """\
Build a palette between a small and a large anchor (local folders or Hub ids of llama/mistral/qwen2
models sharing a tokenizer), fit its stitching layers by least squares on calibration text, print the
stitch table and fit errors, and save it (weights, config, tokenizer from SMALL, model card).

  stitched-llama build HuggingFaceTB/SmolLM2-135M-Instruct HuggingFaceTB/SmolLM2-360M-Instruct \\
      --out smollm2-palette --calibration domain.txt train.jsonl"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parents = [
        output_options("folder to save the palette to"),
        tokenizer_option("the one of SMALL"),
        dtype_option("the anchors", default=None),
    ]
    p = add_command(subparsers, "build", run, DESCRIPTION, parents=parents)
    p.add_argument("small", metavar="SMALL", help="small anchor: model folder or Hub id")
    p.add_argument("large", metavar="LARGE", help="large anchor: model folder or Hub id")
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="FILE",
        help="calibration data for the least-squares fit: .txt (paragraphs) and/or .jsonl/.json/.parquet "
        "(instruction records, or records with a `text` field); default: random tokens (worse stitches)",
    )
    p.add_argument(
        "--calibration-records", type=int, default=256, metavar="N", help="use at most N texts/records (default 256)"
    )
    p.add_argument(
        "--stitches",
        metavar='"n,j;n,j"',
        help='explicit (n, j) stitches, e.g. "3,6;2,4" (n small layers, then large layers from j); the anchors '
        "are always added; default: SN-Net's rule, one hybrid per large-anchor cut",
    )
    p.add_argument(
        "--no-share-stitch-layers",
        action="store_true",
        help="one stitching layer per stitch instead of one per small-anchor cut n",
    )
    p.add_argument(
        "--no-map-first-token",
        action="store_true",
        help="let the first token pass through the stitching layer too, instead of the large anchor's mean state",
    )
    p.add_argument("--max-length", type=int, default=512, help="calibration sequences are cut to this many tokens")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge term of the fit, relative (default 1e-2)")
    p.add_argument(
        "--search",
        type=int,
        metavar="K",
        help="search before training: measure every candidate stitch (SN-Net's, their neighbours and layer skips, or "
        "--stitches) on --search-data and keep the best of each of K FLOPs budgets",
    )
    p.add_argument("--search-data", metavar="FILE", help="held-out text or records the search measures on")
    p.add_argument(
        "--skip-blocks",
        default="1,2,4",
        metavar="SIZES",
        help="with --search: sizes of the large-anchor blocks to try skipping, chosen by angular distance "
        "(default 1,2,4; '' for none)",
    )
    return p


def _parse_stitch_pairs(value: str) -> list[tuple[int, int]]:
    pairs = []
    for item in value.replace(" ", "").strip(";").split(";"):
        match = re.fullmatch(r"\(?(\d+),(\d+)\)?", item)
        if match is None:
            raise CliError(
                f'--stitches {value!r} is not a list of n,j pairs: write them as "n,j;n,j", e.g. "4,7;2,4" '
                "(n small-anchor layers kept, j the first large-anchor layer run)"
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def _check_anchor(name: str, role: str) -> None:
    looks_local = os.path.sep in name or name.startswith(".") or name.startswith("~")
    if looks_local and not Path(name).expanduser().exists():
        raise CliError(f"{role} anchor {name!r} does not exist: pass a local model folder or a Hub id")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise CliError(f"{role} anchor {name!r} is a folder without config.json: pass a saved model folder")


def _calibration(files: list[str], tokenizer: Any, max_records: int, max_length: int) -> Any:
    """Token ids of the calibration files (at most `max_records` texts or records in all), as a Dataset."""
    from datasets import Dataset

    from ..data import tokenize_instructions

    if tokenizer is None:
        raise CliError(
            "--calibration needs the anchors' tokenizer, but SMALL has none: pass --tokenizer PATH (a folder or "
            "Hub id holding it)"
        )
    ids: list[list[int]] = []
    for name in files:
        left = max_records - len(ids)
        if left <= 0:
            break
        kind, data = read_data(name, "calibration file")
        if kind == "texts":
            ids += tokenizer(data[:left])["input_ids"]
        else:
            records = data.select(range(min(left, len(data))))
            ids += tokenize_instructions(records, tokenizer, max_length=max_length)["input_ids"]
    return Dataset.from_dict({"input_ids": ids})


def _searched_palette(args: argparse.Namespace, stitches: Any, build_kwargs: dict, load_kwargs: dict) -> Any:
    """`build --search K`: measure the candidates on --search-data, keep the best stitch of each of K budgets."""
    from transformers import AutoModelForCausalLM

    from ..configuration_stitched_llama import StitchedLlamaConfig
    from ..search import candidate_stitches, format_search_table, layer_skip_blocks, search_palette

    if args.search_data is None:
        raise CliError("--search K needs --search-data FILE: held-out text (or records) to measure the stitches on")
    if args.search < 1:
        raise CliError(f"--search {args.search} must be at least 1 budget")
    small = AutoModelForCausalLM.from_pretrained(args.small, **load_kwargs).eval()
    large = AutoModelForCausalLM.from_pretrained(args.large, **load_kwargs).eval()
    tokenizer = build_kwargs["tokenizer"]
    heldout, collator, _ = evaluation_data(
        args.search_data, tokenizer, large.config.max_position_embeddings, args.max_length, None
    )
    if stitches is None:
        sizes = [int(v) for v in args.skip_blocks.split(",") if v.strip()] if args.skip_blocks else []
        calibration = build_kwargs["calibration"]
        blocks = layer_skip_blocks(large, calibration, tokenizer, sizes, max_length=args.max_length) if sizes else []
        config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
        stitches = candidate_stitches(config, blocks)
    palette, rows = search_palette(
        small, large, stitches, heldout=heldout, num_budgets=args.search,
        evaluate_kwargs={"collator": collator, "progress": False}, **build_kwargs,
    )  # fmt: skip
    print(f"\nSearch: {len(rows)} stitches measured on {args.search_data}, the best of {args.search} budgets kept:\n")
    print(format_search_table(rows))
    return palette


def run(args: argparse.Namespace) -> int:
    """Build a palette between two anchors, fit its stitching layers by least squares, and save it."""
    from transformers import AutoTokenizer

    from ..modeling_stitched_llama import StitchedLlamaForCausalLM

    if args.calibration_records < 1:
        raise CliError(f"--calibration-records {args.calibration_records} must be at least 1")
    if args.max_length < 2:
        raise CliError(f"--max-length {args.max_length} must be at least 2 tokens")
    stitches = _parse_stitch_pairs(args.stitches) if args.stitches else None
    _check_anchor(args.small, "small")
    _check_anchor(args.large, "large")
    out = check_out_dir(args.out, args.overwrite)

    tokenizer = None
    source = args.tokenizer or args.small
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001
        if args.tokenizer:
            raise CliError(f"could not load the tokenizer {args.tokenizer!r}: {one_line(error)}") from error
        print(f"note: no tokenizer found in {args.small!r}; the palette is saved without one (pass --tokenizer PATH)")
    calibration = None
    if args.calibration:
        calibration = _calibration(args.calibration, tokenizer, args.calibration_records, args.max_length)
        tokens = sum(len(x) for x in calibration["input_ids"])
        print(f"calibration: {len(calibration)} sequences, {tokens:,} tokens from {', '.join(args.calibration)}")
    else:
        print("calibration: none given, fitting on random tokens (pass --calibration FILE for better stitches)")

    kwargs = {} if args.dtype is None else {"dtype": torch_dtype(args.dtype)}
    build_kwargs = dict(
        calibration=calibration,
        tokenizer=tokenizer,
        share_stitch_layers=not args.no_share_stitch_layers,
        map_first_token=not args.no_map_first_token,
        ridge=args.ridge,
        max_length=args.max_length,
    )
    try:
        if args.search:
            palette = _searched_palette(args, stitches, build_kwargs, kwargs)
        else:
            palette = StitchedLlamaForCausalLM.from_anchors(
                args.small, args.large, stitches=stitches, **build_kwargs, **kwargs
            )
    except OSError as error:
        raise CliError(f"could not load the anchors: {one_line(error)}") from error
    print(f"\nPalette of {palette.num_stitches} stitches between {args.small} and {args.large}:\n")
    print(palette.format_stitch_table())
    errors = getattr(palette, "stitch_fit_errors", {})
    if errors:
        print("\nRelative least-squares fit error per stitching layer (0 = exact, 1 = no better than zero):")
        print("  " + ", ".join(f"P_{key}: {value:.3f}" for key, value in errors.items()))
    palette.save_pretrained(out)
    print(f"\nPalette saved to {out} ({human_bytes(safetensors_bytes(out))} of weights)")
    print(f"next: stitched-llama train {out} --train-file TRAIN.jsonl --output-dir RUN_DIR")
    return 0

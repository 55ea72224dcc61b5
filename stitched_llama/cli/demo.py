"""`stitched-llama demo`: the whole job offline on the built-in model family (the work is `stitched_llama.demo`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._common import CliError, add_command, output_options

DESCRIPTION = """\
Run the whole job offline on the built-in default in a few minutes on a CPU: the built-in family of two
small LLaMA models pretrained alike on Python docs, Shakespeare and WordNet (stitched_llama/assets/family)
-> search the stitch space (hybrids and layer skips) -> ESTA with distillation on text -> every stitch on
held-out Python docs (table + Pareto plot) -> greedy continuations. Everything is saved under --out."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    out = output_options("default ./outputs/demo", overwrite=False, default=os.path.join("outputs", "demo"))
    p = add_command(subparsers, "demo", run, DESCRIPTION, parents=[out])
    p.add_argument("--steps", type=int, default=400, help="ESTA training steps (default 400)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="ESTA peak learning rate (default 2e-3)")
    p.add_argument(
        "--distill-alpha", type=float, default=0.5, help="weight of distillation from the large anchor (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of training")
    p.add_argument("--prompt", default="The module provides", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest continuation, in tokens (default 24)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    return p


def run(args: argparse.Namespace) -> int:
    """The whole job on the built-in model family, offline: search -> ESTA training -> evaluation -> generation."""
    import torch

    from ..demo import run_demo

    for option, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value < 1:
            raise CliError(f"{option} {value} must be at least 1")
    if args.learning_rate <= 0:
        raise CliError(f"--learning-rate {args.learning_rate} must be positive")
    if not 0 <= args.distill_alpha <= 1:
        raise CliError(f"--distill-alpha {args.distill_alpha} must lie in [0, 1]")
    torch.set_num_threads(args.threads)
    run_demo(
        args.out,
        steps=args.steps,
        learning_rate=args.learning_rate,
        distill_alpha=args.distill_alpha,
        seed=args.seed,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
    )
    return 0

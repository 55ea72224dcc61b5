"""`stitched-llama train`: ESTA on every stitch of a palette, then evaluation, deployment, merge and save.

Its parser is transformers' `HfArgumentParser` over `TrainDataArguments` and `StitchTrainingArguments`, so every
`TrainingArguments` flag works. It accepts each flag with dashes (`--output-dir`, as every other command) and with
underscores (`--output_dir`, as transformers' scripts); the help shows the dashes, our options first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

from ._common import CliError, add_command, context_limit, load_palette, read_data, stitch_table

USAGE = "stitched-llama train PALETTE_DIR --train-file FILE --output-dir DIR [training flags]"
DESCRIPTION = """\
Fine-tune every stitch of a palette in one run with ESTA (shared LoRA + stitch-specific biases, importance
sampling of stitches), evaluate each stitch, choose the stitches to deploy, merge the LoRA into the anchors and
save the merged palette (with its tokenizer) to <output-dir>/palette. The report is <output-dir>/esta_report.json.

  stitched-llama train palette --train-file train.jsonl --eval-file val.jsonl --output-dir run \\
      --max-steps 2000 --per-device-train-batch-size 8 --learning-rate 2e-4

Data: .json/.jsonl/.parquet instruction records (Alpaca `instruction`/`input`/`output`, or chat `messages`), or
plain text with --text FILE... (every token scored). Distil from the frozen large anchor with --distill-alpha 0.5.
The data and stitch options come first below; then every TrainingArguments flag (--max-steps, --learning-rate,
--save-steps, --resume-from-checkpoint last, --use-cpu, --bf16, ...). Each flag also takes the underscore spelling
of transformers' scripts (--output_dir)."""


@dataclasses.dataclass
class TrainDataArguments:
    """The `train` command's own options (the rest are `StitchTrainingArguments`)."""

    _argument_group_name = "data"  # HfArgumentParser's help group

    train_file: str = dataclasses.field(
        default=None,
        metadata={"help": "Training records: .json/.jsonl/.parquet (Alpaca or chat). This or --text is required."},
    )
    text: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Plain-text files (.txt, or records with a `text` field) to train on instead, every token "
            "scored: generic text to heal stitches with. Cut into --max-length blocks; 10%% are held out."
        },
    )
    eval_file: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out records; default: 10%% of the training records (at most 500) are held out."},
    )
    max_length: int = dataclasses.field(default=512, metadata={"help": "Longest training example, in tokens."})
    tokenizer: str | None = dataclasses.field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: the one saved with the palette."}
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    # A stand-in that takes no options: `main` hands everything after `train` to `train_parser()`, built when the
    # command runs (it imports transformers). The same usage line is printed with a user error.
    return add_command(
        subparsers, "train", run, "Fine-tune with ESTA; see `stitched-llama train --help` for all flags.",
        usage=USAGE, add_help=False,
    )  # fmt: skip


class _DashHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows `--output-dir`, not `--output_dir, --output-dir`: one flag style in the help, both accepted."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        names = action.option_strings
        dashed = [s for s in names if s == s.replace("_", "-") or s.replace("_", "-") not in names]
        if dashed != names:
            action = copy.copy(action)
            action.option_strings = dashed
        return super()._format_action_invocation(action)


def train_parser() -> Any:
    """The real parser of `train`: `TrainDataArguments`, `StitchTrainingArguments` and PALETTE_DIR."""
    from transformers import HfArgumentParser

    from ..trainer import StitchTrainingArguments

    parser = HfArgumentParser(
        (TrainDataArguments, StitchTrainingArguments),
        prog="stitched-llama train",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=_DashHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("palette_dir", metavar="PALETTE_DIR", help="Palette folder (`stitched-llama build` output).")
    return parser


def _compact_training_output(trainer: Any) -> None:
    """Replace the Trainer's log printing (a dict of ~4 values per stitch) by one short line per log."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    def line(logs: dict, state: Any) -> str | None:
        if "loss" in logs:
            parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            trained = sorted(int(k.split("_")[1].split("/")[0]) for k in logs if k.endswith("/loss"))
            if trained:
                parts.append(f"sampled stitches {','.join(map(str, trained))}")
            return "  ".join(parts)
        evals = sorted(
            (k for k in logs if re.fullmatch(r"\w+_stitch\d+_loss", k)), key=lambda k: int(k[:-5].split("stitch")[-1])
        )
        if evals:
            out = []
            for key in evals:
                k = key[:-5].split("stitch")[-1]
                ppl = logs.get(key.replace("_loss", "_perplexity"))
                out.append(f"eval stitch {k}: loss {logs[key]:.4f}" + (f", perplexity {ppl:.4g}" if ppl else ""))
            return "\n".join(out)
        if "train_runtime" in logs:
            mean = logs.get("train_loss", float("nan"))
            return f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s, mean loss {mean:.4f}"
        rest = {k: v for k, v in logs.items() if not k.startswith("stitch_") and k != "total_flos"}
        return str({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in rest.items()}) if rest else None

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(logs or {}, state) if state.is_world_process_zero else None
            if text:
                (self.training_bar.write if self.training_bar is not None else print)(text)

    class CompactPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(logs or {}, state) if state.is_world_process_zero else None
            if text:
                print(text, flush=True)

    had_bars = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(CompactProgress() if had_bars else CompactPrinter())


def _held_out(dataset: Any, seed: int, what: str) -> tuple[Any, Any]:
    """(train, eval): 10% (at most 500) held out, or the training data itself when it is too small to split."""
    if len(dataset) < 10:
        print(f"no --eval-file and only {len(dataset)} {what}: evaluating on the training {what}")
        return dataset, dataset
    held_out = min(500, max(1, len(dataset) // 10))
    split = dataset.train_test_split(test_size=held_out, seed=seed)
    print(f"no --eval-file: holding out {held_out} of the training {what} for evaluation")
    return split["train"], split["test"]


def _record_splits(data_args: Any, tokenizer: Any, max_length: int, limit: int, seed: int) -> tuple[Any, Any]:
    from ..data import tokenize_instructions

    kind, records = read_data(data_args.train_file, "--train-file")
    if kind != "records":
        raise CliError(
            f"--train-file {data_args.train_file!r} holds plain text: pass it as --text, or pass instruction "
            "records (.jsonl with `instruction`/`output` or `messages`)"
        )
    if data_args.eval_file:
        kind, eval_records = read_data(data_args.eval_file, "--eval-file")
        if kind != "records":
            raise CliError(f"--eval-file {data_args.eval_file!r} holds plain text; pass instruction records")
    else:
        records, eval_records = _held_out(records, seed, "records")
    return tuple(
        tokenize_instructions(data, tokenizer, max_length=max_length, model_max_length=limit)
        for data in (records, eval_records)
    )


def _text_splits(data_args: Any, tokenizer: Any, max_length: int, seed: int) -> tuple[Any, Any]:
    from ..data import tokenize_texts

    def blocks(paths: list[str], option: str) -> Any:
        texts = []
        for path in paths:
            kind, data = read_data(path, option)
            if kind != "texts":
                raise CliError(f"{option} {path!r} holds instruction records: pass it as --train-file")
            texts += data
        return tokenize_texts(texts, tokenizer, block_size=max_length)

    train_data = blocks(data_args.text, "--text")
    if data_args.eval_file:
        return train_data, blocks([data_args.eval_file], "--eval-file")
    return _held_out(train_data, seed, "text blocks")


def run(args: argparse.Namespace) -> int:
    """Fine-tune all stitches with ESTA, evaluate, deploy, merge and save (see `stitched-llama train --help`)."""
    parser = train_parser()
    raw = parser.parse_args(args.train_argv)  # argparse errors (missing PALETTE_DIR, bad choices) exit 2 here
    if (raw.train_file is None) == (raw.text is None):
        parser.error("pass one of --train-file FILE (instruction records) or --text FILE... (plain text)")
    if raw.output_dir is None:
        parser.error("--output-dir DIR is required (checkpoints, the report and the merged palette go there)")
    data_args, training_args, _ = parser.parse_args_into_dataclasses(args=args.train_argv)

    from ..esta import trainable_parameters
    from ..trainer import REPORT
    from ..workflow import MERGED_DIR, train_palette

    if data_args.max_length < 2:
        raise CliError(f"--max-length {data_args.max_length} must be at least 2 tokens")
    palette = load_palette(raw.palette_dir, tokenizer=data_args.tokenizer, need_tokenizer=True)
    tokenizer = palette.tokenizer
    limit = context_limit(palette)
    max_length = min(data_args.max_length, limit)
    if data_args.text is not None:
        train_data, eval_data = _text_splits(data_args, tokenizer, max_length, training_args.seed)
    else:
        train_data, eval_data = _record_splits(data_args, tokenizer, max_length, limit, training_args.seed)

    def before_training(trainer: Any) -> None:
        _compact_training_output(trainer)
        report = trainable_parameters(trainer.model)
        print(
            f"ESTA ({training_args.method}, {training_args.sampling} sampling) on {palette.num_stitches} stitches: "
            f"{report['trainable']:,} trainable parameters of {report['total']:,} "
            f"({report['trainable_percent']:.2f}%)"
        )

    result = train_palette(
        palette, training_args, train_data, eval_data, tokenizer=tokenizer, before_training=before_training
    )
    print()
    print(stitch_table(result.palette))
    print(f"\ndeployed stitches: {result.palette.config.deployed_stitches}")
    out = Path(training_args.output_dir) / MERGED_DIR
    print(f"merged palette saved to {out}; report in {Path(training_args.output_dir) / REPORT}")
    return 0

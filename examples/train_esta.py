"""Fine-tune a whole palette in one run with ESTA, then merge and save it.

    # built-in default: tiny anchors + the bundled instruction set, a few minutes on a CPU
    python examples/train_esta.py --output-dir outputs/esta --max-steps 200

    # real anchors (local folders or Hub ids) and your own data
    python examples/train_esta.py --small HuggingFaceTB/SmolLM2-135M-Instruct \
        --large HuggingFaceTB/SmolLM2-360M-Instruct --train-file train.jsonl --eval-file val.jsonl \
        --output-dir outputs/smollm2 --max-steps 2000 --per-device-train-batch-size 8 --learning-rate 2e-4

Every `TrainingArguments` flag works, plus the stitch flags of `StitchTrainingArguments` (`--sampling`,
`--method`, `--importance-temperature`, `--num-deployed-stitches`, ...); see `--help`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import AutoTokenizer, HfArgumentParser

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.data import builtin_instructions, load_instruction_dataset, tokenize_instructions
from stitched_llama.esta import trainable_parameters
from stitched_llama.tiny import tiny_anchors, tiny_tokenizer
from stitched_llama.trainer import StitchTrainingArguments
from stitched_llama.workflow import train_palette


@dataclass
class ScriptArguments:
    small: str | None = field(default=None, metadata={"help": "Small anchor (folder or Hub id); default: tiny."})
    large: str | None = field(default=None, metadata={"help": "Large anchor (folder or Hub id); default: tiny."})
    train_file: str | None = field(default=None, metadata={"help": "json/jsonl/parquet records; default: built-in."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out records; default: a slice of train."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence, in tokens."})
    calibration_records: int = field(default=256, metadata={"help": "Records used to fit the stitching layers."})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, StitchTrainingArguments)).parse_args_into_dataclasses()

    records = load_instruction_dataset(script.train_file) if script.train_file else builtin_instructions()
    if script.small is None or script.large is None:
        tokenizer = tiny_tokenizer(str(r) for r in records.to_list())
        small, large = tiny_anchors(len(tokenizer), seed=args.seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(script.small)
        small, large = script.small, script.large
    eval_records = load_instruction_dataset(script.eval_file) if script.eval_file else records.select(range(16))

    calibration = tokenize_instructions(records.select(range(min(len(records), script.calibration_records))), tokenizer)
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, calibration=calibration, tokenizer=tokenizer)
    print(palette.format_stitch_table())

    # Truncate to what both anchors can attend over (tokenize_instructions warns when it cuts).
    limit = min(
        palette.config.small_config.max_position_embeddings, palette.config.large_config.max_position_embeddings
    )
    train = tokenize_instructions(records, tokenizer, max_length=min(script.max_length, limit), model_max_length=limit)
    evaluation = tokenize_instructions(
        eval_records, tokenizer, max_length=min(script.max_length, limit), model_max_length=limit
    )

    def show_trainable(trainer) -> None:
        n = trainable_parameters(trainer.model)
        print(f"trainable parameters: {n['trainable']:,} of {n['total']:,} ({n['trainable_percent']:.2f}%)")

    # train (deploying at its end) -> evaluate every stitch -> merge the shared LoRA -> save with the tokenizer
    result = train_palette(palette, args, train, evaluation, tokenizer=tokenizer, before_training=show_trainable)
    print(f"deployed stitches: {result.palette.config.deployed_stitches}")
    print(f"merged palette saved to {result.saved_to}; report in {os.path.join(args.output_dir, 'esta_report.json')}")


if __name__ == "__main__":
    main()

"""One ESTA run from a built palette to a deployed, merged one: the sequence the CLI, the demo, the example and the
benchmarks share (docs/training.md).

    result = train_palette(palette, StitchTrainingArguments(output_dir="run", max_steps=2000), train, evaluation,
                           tokenizer=tokenizer)
    result.palette          # LoRA merged in, stitch biases kept, deployed stitches and measurements set
    result.trainer          # the StitchTrainer, for its sampler and history

Building the palette (`from_anchors`, `search_palette`) comes before and stays the caller's choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from .data import collate_fn
from .esta import merge_esta
from .modeling_stitched_llama import StitchedLlamaForCausalLM
from .trainer import StitchTrainer, StitchTrainingArguments

MERGED_DIR = "palette"


@dataclass
class TrainedPalette:
    palette: StitchedLlamaForCausalLM  # merged: no peft wrapper, the LoRA folded into the anchors
    trainer: StitchTrainer
    train_output: TrainOutput
    eval_metrics: dict[str, float] = field(default_factory=dict)  # `trainer.evaluate()` after training, if run
    saved_to: str | None = None


def train_palette(
    palette: StitchedLlamaForCausalLM,
    args: StitchTrainingArguments,
    train_dataset: Any,
    eval_dataset: Any | None = None,
    *,
    tokenizer: Any | None = None,
    data_collator: Callable | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    before_training: Callable[[StitchTrainer], None] | None = None,
    save: bool = True,
    **trainer_kwargs: Any,
) -> TrainedPalette:
    """Train every stitch at once (deploying at the end of `train()`), evaluate each stitch on `eval_dataset`,
    merge the shared LoRA, and save the merged palette to `<output_dir>/palette` with the tokenizer.

    `resume_from_checkpoint="last"` (or True) resumes from the newest complete checkpoint. `before_training` gets
    the trainer once it is built, e.g. to change how it prints. The collator defaults to `collate_fn(tokenizer)`;
    `trainer_kwargs` (e.g. `optimizers`) go to `StitchTrainer`.
    """
    if data_collator is None and tokenizer is not None:
        data_collator = collate_fn(tokenizer)
    trainer = StitchTrainer(
        model=palette,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        callbacks=list(callbacks or []),
        **trainer_kwargs,
    )
    if before_training is not None:
        before_training(trainer)
    resume = args.resume_from_checkpoint
    output = trainer.train(resume_from_checkpoint=True if resume in ("last", True) else resume)
    # After train(), evaluating also refreshes the deployment report and the palette's metrics.
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    merged = merge_esta(trainer.model)
    if tokenizer is not None:
        merged.tokenizer = tokenizer
    saved_to = None
    if save and trainer.args.should_save:
        saved_to = os.path.join(args.output_dir, MERGED_DIR)
        merged.save_pretrained(saved_to)
    return TrainedPalette(merged, trainer, output, eval_metrics=metrics, saved_to=saved_to)


__all__ = ["MERGED_DIR", "TrainedPalette", "train_palette"]

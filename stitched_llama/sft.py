"""ESTA with TRL: `StitchSFTTrainer` keeps SFT's data handling (chat templates, assistant-only loss, packing) and
trains one sampled stitch per step, with the stitch logic `StitchTrainer` uses (docs/training.md, "TRL").

    args = StitchSFTConfig(output_dir="out", max_steps=500, sampling="uniform", assistant_only_loss=True)
    trainer = StitchSFTTrainer(model=palette, args=args, train_dataset=chats, processing_class=tokenizer)
    trainer.train()

Needs `trl` (`pip install stitched-llama[trl]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from .trainer import StitchTrainerMixin, StitchTrainingArguments


@dataclass
class StitchSFTConfig(StitchTrainingArguments, SFTConfig):
    """`SFTConfig` plus the stitch options of `StitchTrainingArguments`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill_alpha > 0:
            # TRL's fused head computes the loss without full logits, which distillation needs.
            raise ValueError("distill_alpha > 0 is not supported with StitchSFTTrainer yet: use StitchTrainer.")


class StitchSFTTrainer(StitchTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` training one sampled stitch of a palette per optimizer step."""

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # TRL's fused head reads `get_output_embeddings()`, which follows the active stitch: make it the step's one.
        active = self.palette.config.default_stitch
        self.palette.set_stitch(self._stitch_for_step())
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.palette.config.default_stitch = active

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._eval_stitch is None:
            return super().prediction_step(model, inputs, *args, **kwargs)
        active = self.palette.config.default_stitch
        self.palette.set_stitch(self._eval_stitch)
        try:
            return super().prediction_step(model, inputs, *args, **kwargs)
        finally:
            self.palette.config.default_stitch = active


__all__ = ["StitchSFTConfig", "StitchSFTTrainer"]

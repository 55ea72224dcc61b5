"""ESTA fine-tuning of a whole palette in one run, as a thin `Trainer` subclass (docs/training.md).

    args = StitchTrainingArguments(output_dir="out", sampling="importance", max_steps=500)
    trainer = StitchTrainer(model=palette, args=args, train_dataset=train, data_collator=collator)
    trainer.train()                  # one stitch per optimizer step, importance from SNIP saliency
    palette = merge_esta(trainer.model)   # deployed stitches are in palette.config.deployed_stitches

Every micro-batch of an optimizer step trains the same stitch, and every data-parallel rank uses the same one.
Checkpoints carry the sampler state (`StitchSamplerCallback`, in `trainer_state.json`) and the stitch biases, so
`resume_from_checkpoint` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import logging

from .checkpoint import ManifestCallback, last_complete_checkpoint, verify_checkpoint, write_json_atomically
from .distillation import TeacherCache, causal_lm_loss, distillation_loss, teacher_topk
from .esta import METHODS, EstaConfig, prepare_esta, stitch_bias_norms, trainable_parameters, unwrap_palette
from .modeling_stitched_llama import StitchedLlamaForCausalLM, check_finite, stitch_of_bias
from .sampler import StitchSampler, StitchSamplerCallback, select_stitches_to_deploy

logger = logging.get_logger(__name__)

SAMPLER_STATE = "stitch_sampler.json"  # where checkpoints written before `StitchSamplerCallback` kept the sampler
TRAINABLE_EXTRAS = "stitch_trainable.safetensors"
REPORT = "esta_report.json"
SAMPLINGS = ("importance", "uniform", "loss-gap")


@dataclass(kw_only=True)
class StitchArguments:
    """How stitches are sampled, adapted and deployed: the options `StitchTrainingArguments` adds to
    `TrainingArguments`. Keyword-only, so `StitchTrainingArguments("out")` still means `output_dir="out"`."""

    method: str = field(
        default="esta",
        metadata={
            "help": "`esta` (shared LoRA + stitch biases), `lora-no-bias` (shared LoRA only) or `snnet-full` "
            "(SN-Net direct adaptation: all anchor weights trainable, uniform sampling).",
            "choices": list(METHODS),
        },
    )
    sampling: str = field(
        default="importance",
        metadata={
            "help": "How the stitch of each step is drawn: `importance` (SNIP saliency, the paper), `uniform`, or "
            "`loss-gap` (how far a stitch's running training loss lies above that of the cheaper stitches).",
            "choices": list(SAMPLINGS),
        },
    )
    importance_ema: float = field(
        default=0.9, metadata={"help": "Weight of the previous importance in its moving average."}
    )
    importance_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature over standardised importances (lower = greedier)."}
    )
    importance_eps: float = field(
        default=0.2, metadata={"help": "Share of the sampling probability spread uniformly over all stitches."}
    )
    loss_gap_reference: str = field(
        default="none",
        metadata={
            "help": "What loss-gap measures a stitch's loss against on each batch: `none` (its cross-entropy as "
            "is), or `teacher` (less the frozen large anchor's on the same batch, so that easy and hard batches "
            "cancel; one more forward pass per step without distillation).",
            "choices": ["none", "teacher"],
        },
    )
    loss_gap_keep_frontier: bool = field(
        default=False,
        metadata={
            "help": "With `loss-gap` sampling, stitches on the frontier of the running losses keep their uniform "
            "share of the steps, and only the rest is spread by gap (docs/training.md)."
        },
    )
    stitch_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Steps that visit the stitches in turn before importance is used (default: one per stitch)."},
    )
    saliency_params: str = field(
        default="shared",
        metadata={
            "help": "Parameters whose |theta * grad| scores a stitch: `shared` (LoRA and other shared weights) or "
            "`all` (also the stitch's own biases, which favours stitches already sampled often).",
            "choices": ["shared", "all"],
        },
    )
    train_stitches: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated indices of the stitches to train (default: all). One index fine-tunes that "
            "stitch alone, e.g. to compare with tuning each size separately."
        },
    )
    stitch_weights: str | None = field(
        default=None,
        metadata={
            "help": "With `uniform` sampling: comma-separated shares of the steps, one per stitch of "
            "`train_stitches` in its order (or per stitch of the palette), e.g. '2,1,1' to give the first twice "
            "the steps of each other (default: equal shares)."
        },
    )
    num_deployed_stitches: int = field(
        default=4,
        metadata={
            "help": "FLOPs intervals to split the cost range into; the most important stitch of each is "
            "deployed, plus both anchors."
        },
    )
    eval_stitches: str = field(
        default="all",
        metadata={
            "help": "Stitches to evaluate: `all`, or `deployed` once a choice exists.",
            "choices": ["all", "deployed"],
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (ignored by snnet-full)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated anchor linears to adapt; add gate_proj,up_proj,down_proj for the MLPs."},
    )
    train_stitch_layers: bool = field(
        default=False,
        metadata={
            "help": "Train the stitching layers' own weights, as SN-Net does, instead of a LoRA on them (esta and "
            "lora-no-bias; snnet-full trains them anyway)."
        },
    )
    distill_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight of distillation from the frozen large anchor: loss = (1 - alpha) * CE + alpha * KD. "
            "0 trains on the labels alone; the large-anchor stitch always does."
        },
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of distillation."})
    distill_top_k: int | None = field(
        default=None,
        metadata={"help": "Keep the teacher's k most likely tokens (renormalised); None keeps the whole vocabulary."},
    )
    distill_cache: bool = field(
        default=False,
        metadata={
            "help": "Remember the teacher's top-k log-probabilities of each training example after its first "
            "visit (needs distill_top_k), so later epochs skip the teacher's forward pass."
        },
    )


# `StitchArguments` is the last base, so its fields come first in `dataclasses.fields()`: `HfArgumentParser` lists
# our options before the ~100 of `TrainingArguments`.
@dataclass
class StitchTrainingArguments(TrainingArguments, StitchArguments):
    """`TrainingArguments` plus how stitches are sampled, adapted and deployed (`StitchArguments`)."""

    # The help group HfArgumentParser puts these options in (its documented hook for argument groups).
    _argument_group_name = "training: the stitch options, then every TrainingArguments flag"

    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation keeps only the loss (per-stitch logits would not fit in memory)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked here, when the arguments are built, so a bad value fails before any model is loaded.
        choices = {"method": METHODS, "sampling": SAMPLINGS, "saliency_params": ("shared", "all")}
        choices["eval_stitches"] = ("all", "deployed")
        choices["loss_gap_reference"] = ("none", "teacher")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}.")
        ranges = {  # name -> (low, high, low included, high included)
            "importance_ema": (0.0, 1.0, True, False),
            "importance_eps": (0.0, 1.0, True, True),
            "importance_temperature": (0.0, math.inf, False, False),
            "distill_alpha": (0.0, 1.0, True, True),
            "distill_temperature": (0.0, math.inf, False, False),
            "lora_dropout": (0.0, 1.0, True, False),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            value = getattr(self, name)
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (isinstance(value, (int, float)) and above and below):  # NaN fails both comparisons
                interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
                raise ValueError(f"{name}={value} must lie in {interval}.")
        minimums = {"num_deployed_stitches": 1, "lora_r": 1, "stitch_warmup_steps": 0, "distill_top_k": 1}
        for name, low in minimums.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name}={value} must be at least {low}.")
        self._train_stitch_list()  # the format now; the range once the palette is known (`stitch_indices`)
        self._stitch_weight_list()
        if not any(m.strip() for m in self.lora_target_modules.split(",")):
            raise ValueError(
                f"lora_target_modules={self.lora_target_modules!r} names no module: pass e.g. 'q_proj,v_proj'."
            )
        if self.distill_cache and self.distill_top_k is None:
            raise ValueError("distill_cache=True needs distill_top_k (e.g. 64) to bound the memory it uses.")
        if self.loss_gap_reference == "teacher" and (self.distill_cache or self.method == "snnet-full"):
            raise ValueError(
                "loss_gap_reference='teacher' needs the frozen large anchor's full output on every batch: it cannot "
                "read it from the teacher cache (set distill_cache=False) nor from trained anchors (method='esta')."
            )
        if self.distill_alpha > 0 and self.method == "snnet-full":
            raise ValueError(
                "distill_alpha > 0 needs frozen anchors to distill from, and snnet-full trains them: use "
                "method='esta' or 'lora-no-bias'."
            )
        self.esta_config()  # the LoRA fields are checked where they are used

    def _train_stitch_list(self) -> list[int] | None:
        """`train_stitches` as integers, or None for all stitches."""
        if self.train_stitches is None:
            return None
        try:
            return [int(part) for part in self.train_stitches.split(",")]
        except ValueError:
            raise ValueError(
                f"train_stitches={self.train_stitches!r} must be comma-separated stitch indices, e.g. '0' or '0,3'."
            ) from None

    def stitch_indices(self, num_stitches: int) -> list[int] | None:
        """`train_stitches` as indices into a palette of `num_stitches` (negative ones count from the end)."""
        indices = self._train_stitch_list()
        for k in indices or ():
            if not -num_stitches <= k < num_stitches:
                raise ValueError(
                    f"train_stitches={self.train_stitches!r}: '{k}' is not a stitch index of this palette; "
                    f"use comma-separated integers in {-num_stitches}..{num_stitches - 1}."
                )
        return None if indices is None else [k % num_stitches for k in indices]

    def _stitch_weight_list(self) -> list[float] | None:
        """`stitch_weights` as floats, checked against `sampling` and `train_stitches`; None for equal shares."""
        if self.stitch_weights is None:
            return None
        try:
            weights = [float(part) for part in self.stitch_weights.split(",")]
        except ValueError:
            raise ValueError(
                f"stitch_weights={self.stitch_weights!r} must be comma-separated numbers, e.g. '2,1,1'."
            ) from None
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"stitch_weights={self.stitch_weights!r}: every share must be a positive number.")
        if self.sampling != "uniform" and self.method != "snnet-full":
            raise ValueError(
                f"stitch_weights set the shares of uniform sampling, but sampling={self.sampling!r} learns them: "
                "set sampling='uniform' or leave stitch_weights out."
            )
        trained = self._train_stitch_list()
        if trained is not None and len(weights) != len(trained):
            raise ValueError(
                f"stitch_weights={self.stitch_weights!r} needs one share per stitch of "
                f"train_stitches={self.train_stitches!r}."
            )
        return weights

    def sampling_weights(self, num_stitches: int) -> list[float] | None:
        """`stitch_weights` as one share per stitch of a palette of `num_stitches` (0 for those not trained)."""
        weights = self._stitch_weight_list()
        if weights is None:
            return None
        trained = self.stitch_indices(num_stitches) or list(range(num_stitches))
        if len(weights) != len(trained):
            raise ValueError(
                f"stitch_weights={self.stitch_weights!r} has {len(weights)} shares for a palette of {num_stitches} "
                "stitches: give one per stitch, or name the stitches they are for in train_stitches."
            )
        if len(set(trained)) != len(trained):
            raise ValueError(
                f"train_stitches={self.train_stitches!r} names a stitch twice: with stitch_weights, name each "
                "once and give it its share."
            )
        full = [0.0] * num_stitches
        for k, weight in zip(trained, weights):
            full[k] = weight
        return full

    def esta_config(self) -> EstaConfig:
        return EstaConfig(
            method=self.method,
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip()),
            train_stitch_layers=self.train_stitch_layers,
        )


class _SaliencyCallback(TrainerCallback):
    """Scores the step's stitch once its gradients are complete and clipped, just before the optimizer step."""

    def __init__(self, trainer: StitchTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._score_step()


class StitchTrainerMixin:
    """The stitch logic of `StitchTrainer` and `StitchSFTTrainer`, on `Trainer`'s documented hooks: one sampled
    stitch per optimizer step, its score, per-stitch evaluation, checkpoints that carry the sampler, deployment.

    `model` may be a bare palette (it is then prepared with `args.method`, see `prepare_esta`) or a model already
    returned by `prepare_esta`.
    """

    def __init__(self, model: nn.Module, args: StitchTrainingArguments, **kwargs: Any) -> None:
        if not isinstance(args, StitchTrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs StitchTrainingArguments (TrainingArguments plus stitch options)."
            )
        if isinstance(model, StitchedLlamaForCausalLM) and getattr(model, "esta_method", None) is None:
            model = prepare_esta(model, args.esta_config())
        super().__init__(model=model, args=args, **kwargs)
        self.palette = unwrap_palette(self.model)
        sampling = args.sampling
        if args.method == "snnet-full" and sampling != "uniform":
            logger.info("snnet-full is SN-Net direct adaptation: sampling stitches uniformly.")
            sampling = "uniform"
        self.add_callback(
            StitchSamplerCallback(
                self.palette.num_stitches,
                mode=sampling,
                ema=args.importance_ema,
                temperature=args.importance_temperature,
                eps=args.importance_eps,
                warmup_steps=args.stitch_warmup_steps,
                seed=args.seed,
                costs=[self.palette.config.stitch_cost(k).flops_per_token for k in range(self.palette.num_stitches)],
                stitches=args.stitch_indices(self.palette.num_stitches),
                keep_frontier=args.loss_gap_keep_frontier,
                weights=args.sampling_weights(self.palette.num_stitches),
            )
        )
        self._step_stitch: int | None = None
        self._step_of_stitch = -1
        self._eval_stitch: int | None = None
        self._stitch_losses: dict[int, list[float]] = defaultdict(list)
        self._step_losses: list[torch.Tensor] = []  # this step's micro-batch losses, read once at its end
        # The cross-entropy share of each micro-batch loss (1 without distillation): the sampler and the per-stitch
        # logs compare stitches on cross-entropy, since the large anchor trains on it alone.
        self._ce_share: torch.Tensor | None = None
        self._step_ce: list[torch.Tensor] = []
        # What loss-gap scores, as a share of each micro-batch loss: the cross-entropy, less the frozen large
        # anchor's on the same batch with `loss_gap_reference="teacher"` (so batches of unequal difficulty cancel).
        self._score_share: torch.Tensor | None = None
        self._step_scores: list[torch.Tensor] = []
        self._deployed = False
        self._changed_untrained: list[int] = []  # deployed, never trained, but sharing updated weights
        self.last_eval_metrics: dict[str, float] = {}
        self.teacher_cache = TeacherCache(args.distill_top_k) if args.distill_cache and args.distill_alpha > 0 else None
        if args.distill_alpha > 0 and getattr(self.palette, "esta_method", None) == "snnet-full":
            raise ValueError("distill_alpha > 0 needs frozen anchors, and this model trains them (snnet-full).")
        self.add_callback(_SaliencyCallback(self))
        self.add_callback(ManifestCallback())
        report = trainable_parameters(self.model)
        logger.info(
            f"Trainable parameters: {report['trainable']:,} of {report['total']:,} ({report['trainable_percent']:.3f}%)"
        )

    # ----- the sampler lives in a callback, whose state Transformers checkpoints -----

    @property
    def sampler_callback(self) -> StitchSamplerCallback:
        # Looked up rather than kept: `restore_callback_states_from_checkpoint=True` makes `Trainer` replace it.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StitchSamplerCallback):
                return callback
        raise RuntimeError("This trainer's StitchSamplerCallback was removed: it holds the stitch sampler.")

    @property
    def sampler(self) -> StitchSampler:
        return self.sampler_callback.sampler

    @property
    def stitch_history(self) -> list[int]:
        """The stitch of every optimizer step so far (restored on resume)."""
        return self.sampler_callback.history

    # ----- one stitch per optimizer step -----

    def _stitch_for_step(self) -> int:
        step = self.state.global_step
        if self._step_of_stitch != step:
            stitch = self.sampler.sample(step)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every rank drew from the same generator; rank 0's draw is authoritative all the same.
                chosen = torch.tensor([stitch], dtype=torch.long, device=self.args.device)
                torch.distributed.broadcast(chosen, src=0)
                if int(chosen) != stitch:
                    self.sampler.counts[stitch] -= 1
                    stitch = int(chosen)
                    self.sampler.counts[stitch] += 1
            self._step_stitch, self._step_of_stitch = stitch, step
            self.stitch_history.append(stitch)
        return self._step_stitch

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        stitch = self._stitch_for_step()
        loss = super().training_step(model, {**inputs, "stitch": stitch}, num_items_in_batch)
        # Kept on the device and read once the step's gradients are complete (`_score_step`): no sync per micro-batch.
        self._step_losses.append(loss.detach())
        for share, kept in ((self._ce_share, self._step_ce), (self._score_share, self._step_scores)):
            kept.append(loss.detach() * share if share is not None else loss.detach())
        self._ce_share = self._score_share = None
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Cross-entropy from `Trainer`, mixed in training with distillation from the frozen large anchor
        (`distill_alpha`; see `stitched_llama.distillation`). Evaluation losses stay cross-entropy."""
        alpha = self.args.distill_alpha
        stitch = inputs.get("stitch")
        large = self.palette.num_stitches - 1
        training = model.training and stitch is not None
        distill = alpha > 0 and training and stitch % self.palette.num_stitches != large
        reference = training and self.args.loss_gap_reference == "teacher"
        # Ask for the outputs only when they are used: TRL's fused head builds the logits with an extra pass.
        wants = return_outputs or distill
        result = super().compute_loss(model, inputs, return_outputs=wants, num_items_in_batch=num_items_in_batch)
        ce, outputs = result if wants else (result, None)
        loss, score = ce, ce
        if distill or reference:
            ids, logprobs, teacher_ce = self._teacher(model, inputs, num_items_in_batch)
        if distill:
            kd = distillation_loss(
                outputs.logits, ids, logprobs, inputs["labels"], self.args.distill_temperature, num_items_in_batch
            )
            loss = (1 - alpha) * ce + alpha * self._as_trainer_scales(kd, num_items_in_batch)
        if reference:
            score = ce - teacher_ce
        if training and loss.requires_grad:
            # `training_step` scales the loss it returns; these shares read the same scale off it.
            self._ce_share, self._score_share = ((x / loss).detach().nan_to_num(0.0, 0.0, 0.0) for x in (ce, score))
        return (loss, outputs) if return_outputs else loss

    def _as_trainer_scales(self, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        # `Trainer.compute_loss` multiplies the model's loss by the process count when it averages tokens across
        # devices: a loss computed here must be on the same scale to be mixed with it or subtracted from it.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def _teacher(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The frozen large anchor's top-k (ids, log-probabilities), `[batch, seq, k]` (ids None for the whole
        vocabulary: `teacher_topk`), from the cache or a live pass, and with `loss_gap_reference="teacher"` its
        cross-entropy on the labels (a live pass: the cache is refused)."""
        peft_model = self.accelerator.unwrap_model(model)
        teacher_ce = None

        def live() -> tuple[torch.Tensor | None, torch.Tensor]:
            nonlocal teacher_ce
            adapters = peft_model.disable_adapter() if isinstance(peft_model, PeftModel) else contextlib.nullcontext()
            with torch.no_grad(), adapters, self.palette.disable_stitch_biases():
                logits = peft_model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs.get("attention_mask"),
                    stitch=self.palette.num_stitches - 1,
                    use_cache=False,
                ).logits  # [batch, seq, vocab]
                if self.args.loss_gap_reference == "teacher":
                    ce = causal_lm_loss(logits, inputs["labels"], num_items_in_batch)
                    teacher_ce = self._as_trainer_scales(ce, num_items_in_batch)
            return teacher_topk(logits, self.args.distill_temperature, self.args.distill_top_k)

        if self.teacher_cache is None:
            return *live(), teacher_ce
        return *self.teacher_cache.lookup(inputs["input_ids"], inputs.get("attention_mask"), live), teacher_ce

    def _score_step(self) -> None:
        # Micro-batch losses come scaled so that their sum is the step's loss; one copy to the host reads them all.
        kept = (self._step_losses, self._step_ce, self._step_scores)
        losses, ce, scores = (torch.stack(x).cpu().tolist() if x else [] for x in kept)
        self._step_losses, self._step_ce, self._step_scores = [], [], []
        bad = next((value for value in losses if not math.isfinite(value)), None)
        if bad is not None:
            raise FloatingPointError(
                f"Loss is {bad} at step {self.state.global_step} (stitch {self._step_stitch}): training stopped and "
                "no checkpoint was written over the last good one. Lower the learning rate or set max_grad_norm."
            )
        local_loss, step_loss = 0.0, 0.0  # the step's cross-entropy, and what loss-gap scores
        for value, score in zip(ce, scores):  # in order, as plain floats (not `sum`: it compensates from 3.12 on)
            local_loss += value
            step_loss += score
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # A NaN in a weight the step's stitch does not run leaves its loss finite: check every trainable tensor.
        check_finite(
            trainable,
            "training stopped before the optimizer step, and no checkpoint was written over the last good one",
            what="Trainable tensor",
            when=f" at step {self.state.global_step} (stitch {self._step_stitch})",
        )
        if self.sampler.mode != "loss-gap":  # uniform sampling keeps the SNIP score too: deployment reads it
            shared = self.args.saliency_params == "shared"
            params = [p for n, p in trainable if not shared or stitch_of_bias(n) is None]
            self.sampler.update(self._step_stitch, params)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must see the same losses, or their samplers would draw different stitches.
            total = torch.tensor([step_loss], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(total)
            step_loss = float(total) / torch.distributed.get_world_size()
        self.sampler.update_loss(self._step_stitch, step_loss)
        self._stitch_losses[self._step_stitch].append(local_loss)

    # ----- logging and evaluation per stitch -----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stitch_losses:
            probabilities = self.sampler.probabilities
            for k in range(self.palette.num_stitches):
                if self._stitch_losses.get(k):
                    logs[f"stitch_{k}/loss"] = sum(self._stitch_losses[k]) / len(self._stitch_losses[k])
                logs[f"stitch_{k}/probability"] = probabilities[k]
                logs[f"stitch_{k}/importance"] = self.sampler.importance[k]
                logs[f"stitch_{k}/visits"] = self.sampler.counts[k]
            self._stitch_losses.clear()
        super().log(logs, start_time)

    def _stitches_to_evaluate(self) -> list[int]:
        deployed = self.palette.config.deployed_stitches
        if self.args.eval_stitches == "deployed" and deployed:
            return list(deployed)
        return list(range(self.palette.num_stitches))

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Evaluate each stitch; metrics are `{prefix}_stitch{k}_loss` / `_perplexity`, and `{prefix}_loss`
        is their mean (so `metric_for_best_model="loss"` keeps working)."""
        metrics: dict[str, float] = {}
        losses = []
        try:
            for k in self._stitches_to_evaluate():
                self._eval_stitch = k
                prefix = f"{metric_key_prefix}_stitch{k}"
                result = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix=prefix)
                loss = result[f"{prefix}_loss"]
                result[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
                losses.append(loss)
                metrics.update(result)
        finally:
            self._eval_stitch = None
        metrics[f"{metric_key_prefix}_loss"] = sum(losses) / len(losses)
        self.last_eval_metrics = metrics
        if self._deployed and not self.is_in_train and metric_key_prefix == "eval":
            # After training, the deployment report follows the newest evaluation: no second `deploy()` needed.
            self._write_deployment_report()
        return metrics

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if self._eval_stitch is not None:
            inputs = {**inputs, "stitch": self._eval_stitch}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ----- checkpoints: stitch biases travel with them (the sampler's state is in trainer_state.json) -----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Nothing with a NaN is written: the newest complete checkpoint stays the last good one.
        check_finite(((n, p) for n, p in self.model.named_parameters() if p.requires_grad), "no checkpoint written")
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        extras = {}
        if isinstance(self.model, PeftModel):  # peft saves LoRA only: keep the other trainable weights too
            extras = {
                n: p.detach().contiguous().cpu()
                for n, p in self.model.named_parameters()
                if p.requires_grad and "lora_" not in n
            }
        if extras:
            save_file(extras, os.path.join(output_dir, TRAINABLE_EXTRAS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        extras_file = os.path.join(resume_from_checkpoint, TRAINABLE_EXTRAS)
        if os.path.exists(extras_file):
            extras = load_file(extras_file)
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in extras.items():
                    params[name].copy_(tensor.to(params[name].device))
        self._load_sampler_state(resume_from_checkpoint)

    def _load_sampler_state(self, checkpoint: str) -> None:
        """The sampler as `checkpoint` left it. Restored here whatever `restore_callback_states_from_checkpoint`
        says (False by default, and it would restore every other callback too): exact resume needs it."""
        callback = self.sampler_callback
        stored = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).stateful_callbacks
        state = stored.get(type(callback).__name__)
        if isinstance(state, dict):
            callback.load_state(state)
            return
        legacy = os.path.join(checkpoint, SAMPLER_STATE)  # checkpoints written before the sampler was a callback
        if not os.path.isfile(legacy):
            raise FileNotFoundError(
                f"{checkpoint} holds no stitch sampler state (neither {type(callback).__name__} in "
                f"{TRAINER_STATE_NAME} nor {SAMPLER_STATE}): it was not written by a StitchTrainer."
            )
        with open(legacy) as f:
            state = json.load(f)
        callback.sampler_state = state
        callback.history = list(state["history"])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = verify_checkpoint(str(resume_from_checkpoint))
            if problem is not None:
                raise OSError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}. Pass resume_from_checkpoint=True to "
                    "resume from the newest complete checkpoint instead."
                )
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self.deploy()  # once, here; a later `evaluate()` refreshes the report with its metrics
        return output

    # ----- one-stage deployment -----

    def deploy(self) -> list[int]:
        """Choose the stitches to deploy (docs/training.md): stored in the config, with the importance and eval
        metrics in the palette's report and `esta_report.json`.

        `train()` calls it at its end; call it again only to choose anew (e.g. after changing the sampler)."""
        config = self.palette.config
        costs = [config.stitch_cost(k) for k in range(self.palette.num_stitches)]
        # loss-gap's importance says where training is needed, not what is good: deploy by running loss there.
        scores = self.sampler.importance
        if self.sampler.mode == "loss-gap":
            scores = [-loss if loss is not None else -math.inf for loss in self.sampler.losses]
        chosen = select_stitches_to_deploy([c.flops_per_token for c in costs], scores, self.args.num_deployed_stitches)
        config.deployed_stitches = chosen
        self._deployed = True
        self._changed_untrained = changed = self._untrained_but_changed(chosen)
        if changed:
            logger.warning(
                f"Deployed stitches {changed} were never trained (no step sampled them), but "
                "they run weights that the trained stitches updated (the shared LoRA), so their quality changed "
                "without being measured: evaluate them (eval_stitches='all') before serving them, serve them with "
                "the LoRA off if it is all they share (peft's `adapter_names=['__base__']`, unmerged), or remove "
                "them from palette.config.deployed_stitches."
            )
        self._write_deployment_report()
        return chosen

    def _untrained_but_changed(self, stitches: list[int]) -> list[int]:
        """Those of `stitches` that no step trained but that run a trainable weight some trained stitch runs."""
        counts = self.sampler.counts
        trained = [k for k, visits in enumerate(counts) if visits > 0]
        prefixes = {k: tuple(p + "." for p in self.palette.stitch_module_prefixes(k)) for k in {*trained, *stitches}}
        updated = [
            name
            for name, param in self.palette.named_parameters()
            if param.requires_grad and any(self.palette.runs_parameter(name, t, prefixes[t]) for t in trained)
        ]
        return [
            k
            for k in stitches
            if counts[k] == 0 and any(self.palette.runs_parameter(name, k, prefixes[k]) for name in updated)
        ]

    def _write_deployment_report(self) -> None:
        """Importance and eval metrics into the palette's report, and `esta_report.json` for the deployment."""
        config = self.palette.config
        chosen = list(config.deployed_stitches)
        costs = [config.stitch_cost(k) for k in range(self.palette.num_stitches)]
        metrics = {}
        for k in range(self.palette.num_stitches):
            row = {
                key: self.last_eval_metrics[f"eval_stitch{k}_{key}"]
                for key in ("loss", "perplexity")
                if f"eval_stitch{k}_{key}" in self.last_eval_metrics
            }
            if row:
                metrics[str(k)] = {f"eval_{key}": value for key, value in row.items()}
        self.palette.update_stitch_report(metrics=metrics or None, importance=self.sampler.importance)
        if self.args.should_save:
            probabilities = self.sampler.probabilities
            bias_norms = stitch_bias_norms(self.model)
            rows = []
            for k, cost in enumerate(costs):
                row = {
                    "stitch": k,
                    "n": config.stitches[k][0],
                    "j": config.stitches[k][1],
                    "skip": config.stitches[k][2:] or None,
                    "params": cost.params,
                    "flops_per_token": cost.flops_per_token,
                    "importance": self.sampler.importance[k],
                    "probability": probabilities[k],
                    "visits": self.sampler.counts[k],
                    "bias_norm": bias_norms[k],
                    "deployed": k in chosen,
                }
                for key in ("loss", "perplexity"):
                    metric = self.last_eval_metrics.get(f"eval_stitch{k}_{key}")
                    if metric is not None:
                        row[f"eval_{key}"] = metric
                rows.append(row)
            report = {
                "method": self.args.method,
                "sampling": self.sampler.mode,
                "deployed_stitches": chosen,
                "deployed_untrained_but_changed": self._changed_untrained,
                "trainable_parameters": trainable_parameters(self.model),
                "stitches": rows,
            }
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json_atomically(os.path.join(self.args.output_dir, REPORT), report)


class StitchTrainer(StitchTrainerMixin, Trainer):
    """A `Trainer` that trains one sampled stitch of a palette per optimizer step (ESTA, docs/training.md).

    `model` may be a bare palette (it is then prepared with `args.method`, see `prepare_esta`) or a model already
    returned by `prepare_esta`.
    """


__all__ = [
    "StitchArguments",
    "StitchTrainer",
    "StitchTrainerMixin",
    "StitchTrainingArguments",
    "last_complete_checkpoint",
    "verify_checkpoint",
]

"""Distillation from the frozen large anchor (docs/training.md, "Distillation").

A stitch learns the large anchor's next-token distribution as well as the labels:

    loss = (1 - alpha) * CE(stitch, labels) + alpha * T^2 * KL(teacher_T || stitch_T)

over the positions the labels score. The teacher is the large-anchor stitch of the same palette with the shared
LoRA and the stitch biases switched off, so it needs no second copy of the weights. Its distribution can be
kept as top-k log-probabilities: `TeacherCache` remembers them per training example after the first visit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value transformers' causal-LM losses skip


def teacher_topk(
    logits: torch.Tensor, temperature: float, top_k: int | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The teacher's log-probabilities at `temperature`, cut to its `top_k` tokens.

    logits `[batch, seq, vocab]` -> (token ids `[batch, seq, k]`, log-probabilities `[batch, seq, k]`). With
    `top_k=None` the ids are None and the log-probabilities cover the whole vocabulary in order, `[batch, seq, vocab]`.
    """
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    if top_k is None:
        return None, logprobs
    if top_k >= logprobs.shape[-1]:
        ids = torch.arange(logprobs.shape[-1], device=logits.device).expand_as(logprobs)
        return ids, logprobs
    values, ids = logprobs.topk(top_k, dim=-1)
    return ids, values


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`T^2 * KL(teacher || student)` summed over the scored positions, divided as transformers' causal-LM loss
    divides its sum: by `num_items_in_batch` when given, else by the number of scored tokens.

    student_logits `[batch, seq, vocab]`; teacher_ids, teacher_logprobs `[batch, seq, k]`, or None and
    `[batch, seq, vocab]` for the whole vocabulary (`teacher_topk(..., top_k=None)`); labels `[batch, seq]`.
    Position `t` predicts label `t + 1`, as in the cross-entropy. A top-k teacher is renormalised over its k tokens.
    """
    scored = labels[:, 1:] != IGNORE_INDEX  # [batch, seq - 1]
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)  # [batch, seq - 1, vocab]
    teacher = teacher_logprobs[:, :-1].float()
    # The whole vocabulary (ids None) skips the gather and the renormalisation, which cost as much as the rest.
    if teacher_ids is not None:
        student = student.gather(-1, teacher_ids[:, :-1])  # [batch, seq - 1, k]
        teacher = teacher - teacher.logsumexp(dim=-1, keepdim=True)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # [batch, seq - 1]
    total = torch.where(scored, kl, torch.zeros_like(kl)).sum() * temperature**2
    return _per_item(total, scored, num_items_in_batch)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy as transformers' causal LMs compute it: summed over the scored positions and divided
    by `num_items_in_batch` when given, else by the number of scored tokens. logits `[batch, seq, vocab]`, labels
    `[batch, seq]`; position `t` predicts label `t + 1`."""
    targets = labels[:, 1:]  # [batch, seq - 1]
    total = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _per_item(total, targets != IGNORE_INDEX, num_items_in_batch)


def _per_item(total: torch.Tensor, scored: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """`total` divided as transformers divides a causal-LM loss: by `num_items_in_batch` when given, else by the
    number of `scored` positions."""
    denominator = num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


class TeacherCache:
    """The teacher's top-k log-probabilities of each training example, computed on its first visit.

    Examples are keyed by their real tokens (padding removed), so any batching or order finds them again. Every
    stitch then learns from the same signal, and later epochs skip the teacher's forward pass. Memory: 8 bytes per
    token per kept log-probability (`top_k` of them).
    """

    def __init__(self, top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"TeacherCache needs top_k >= 1 to bound its memory, got {top_k}.")
        self.top_k = top_k
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _key(ids: torch.Tensor) -> bytes:
        return hashlib.blake2b(ids.detach().to("cpu", torch.int64).numpy().tobytes(), digest_size=16).digest()

    def lookup(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (ids, log-probabilities), each `[batch, seq, k]`; `compute()` runs the teacher on the
        whole batch when any row is new. Right padding is assumed (the package's collators pad on the right)."""
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        lengths = mask.sum(dim=1).tolist()
        keys = [self._key(row[:length]) for row, length in zip(input_ids, lengths)]
        if any(key not in self._rows for key in keys):
            ids, logprobs = compute()
            for b, (key, length) in enumerate(zip(keys, lengths)):
                self._rows[key] = (ids[b, :length].to("cpu", torch.int32), logprobs[b, :length].to("cpu"))
            return ids, logprobs
        batch, seq = input_ids.shape
        ids = torch.zeros(batch, seq, self.top_k, dtype=torch.long, device=input_ids.device)
        logprobs = torch.zeros(batch, seq, self.top_k, device=input_ids.device)
        for b, (key, length) in enumerate(zip(keys, lengths)):
            row_ids, row_logprobs = self._rows[key]
            ids[b, :length] = row_ids.to(ids.device, torch.long)
            logprobs[b, :length] = row_logprobs.to(logprobs.device)
        return ids, logprobs


__all__ = ["TeacherCache", "causal_lm_loss", "distillation_loss", "teacher_topk"]

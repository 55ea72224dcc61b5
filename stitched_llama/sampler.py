"""Which stitch to train at each optimizer step: uniform (optionally with a share per stitch: `weights`), or
importance sampling from SNIP saliency.

Importance of stitch `s` (docs/training.md): after the gradients of a step that trained `s` are complete,
`q = mean over the trainable parameters s used of |theta * grad|`, kept as an exponential moving average `I(s)`.
After a warm-up that visits every stitch in turn, `p(s) = (1 - eps) * softmax(z(s) / tau) + eps / K`, with `z`
the importances standardised across stitches. The sampler draws from its own seeded generator, so every
data-parallel rank that feeds it the same (all-reduced) gradients draws the same stitches. `StitchSamplerCallback`
holds the trainer's sampler and the stitch of every step so far; it is an `ExportableState`, so `Trainer` writes its
whole state (importance, counts, generator, history) into every checkpoint's `trainer_state.json`, for an exact resume.

`loss-gap` sampling scores a stitch instead by how far its running training loss lies above the best running loss
of the stitches that cost no more than it does: a stitch far above that frontier is the one training can still
move onto it. It needs no extra evaluation, only the losses the steps already computed. With `keep_frontier`, the
stitches on that frontier (gap 0) keep their uniform share of the steps and only the rest is spread by gap, so the
shared LoRA is not pulled off the anchors. What loss a step reports (cross-entropy, or cross-entropy less the frozen
large anchor's on the same batch) is the trainer's choice (docs/training.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

MODES = ("importance", "uniform", "loss-gap")


class StitchSampler:
    def __init__(
        self,
        num_stitches: int,
        mode: Literal["uniform", "importance", "loss-gap"] = "importance",
        ema: float = 0.9,
        temperature: float = 1.0,
        eps: float = 0.2,
        warmup_steps: int | None = None,
        seed: int = 0,
        costs: Sequence[float] | None = None,
        stitches: Sequence[int] | None = None,
        keep_frontier: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown sampling mode {mode!r}: use one of {', '.join(MODES)}.")
        if mode == "loss-gap" and (costs is None or len(costs) != num_stitches):
            raise ValueError("loss-gap sampling needs the cost of every stitch (`costs`, one per stitch).")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1): it is the weight of the previous importance.")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps={eps} must be in [0, 1]: it is the share of uniform sampling kept.")
        stitches = list(range(num_stitches)) if stitches is None else sorted(set(stitches))
        if not stitches or not all(isinstance(k, int) and 0 <= k < num_stitches for k in stitches):
            raise ValueError(
                f"stitches={stitches} must be a non-empty list of stitch indices in 0..{num_stitches - 1}."
            )
        if weights is not None:
            if mode != "uniform":
                raise ValueError(
                    f"weights set the shares of uniform sampling, but mode={mode!r} learns them: use "
                    "mode='uniform' or leave weights out."
                )
            if len(weights) != num_stitches or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"weights={list(weights)} must be {num_stitches} finite shares >= 0, one per stitch.")
            if not all(weights[k] > 0 for k in stitches):
                raise ValueError(
                    f"weights={list(weights)} give no share to a trained stitch of {stitches}: give it a positive "
                    "share, or leave it out of the stitches trained."
                )
        self.num_stitches = num_stitches
        self.stitches = stitches  # the stitches that are trained; the others are never drawn
        self.mode = mode
        self.ema = ema
        self.temperature = temperature
        self.eps = eps
        self.keep_frontier = keep_frontier
        self.weights = [1.0] * num_stitches if weights is None else [float(w) for w in weights]
        # Saliency of zero-initialised LoRA B and biases is zero at first: visit every stitch before trusting it.
        self.warmup_steps = len(stitches) if warmup_steps is None else warmup_steps
        self.importance = [0.0] * num_stitches
        self.scored = [False] * num_stitches
        self.counts = [0] * num_stitches
        self.costs = list(costs) if costs is not None else None
        self.losses: list[float | None] = [None] * num_stitches  # running training loss per stitch
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def probabilities(self) -> list[float]:
        """`[num_stitches]`: the chance of each stitch at the next draw (0 for the stitches not trained)."""
        k = len(self.stitches)
        full = [0.0] * self.num_stitches
        if self.mode == "uniform" or not all(self.scored[s] for s in self.stitches):
            total = sum(self.weights[s] for s in self.stitches)
            for s in self.stitches:
                full[s] = self.weights[s] / total
            return full
        drawn = self.stitches
        below = [s for s in self.stitches if self.importance[s] > 0]
        if self.keep_frontier and self.mode == "loss-gap" and below:
            # Stitches on the frontier (gap 0: no cheaper stitch has a lower loss) keep their uniform share, so
            # the shared LoRA is not pulled off them; the rest of the mass goes by gap to the stitches below it.
            for s in set(self.stitches) - set(below):
                full[s] = 1.0 / k
            drawn = below
        mass = len(drawn) / k
        values = torch.tensor([self.importance[s] for s in drawn], dtype=torch.float64)
        std = values.std(unbiased=False)
        z = (values - values.mean()) / std if std > 0 else torch.zeros_like(values)
        p = (1 - self.eps) * torch.softmax(z / self.temperature, dim=0) + self.eps / len(drawn)
        for s, value in zip(drawn, (mass * p).tolist()):
            full[s] = value
        return full

    def sample(self, step: int) -> int:
        """The stitch for optimizer step `step`: round-robin during warm-up, then any stitch not scored yet,
        then drawn from `probabilities`."""
        unscored = [s for s in self.stitches if not self.scored[s]]
        if len(self.stitches) == 1:
            stitch = self.stitches[0]
        elif self.mode != "uniform" and step < self.warmup_steps:
            stitch = self.stitches[step % len(self.stitches)]
        elif self.mode != "uniform" and unscored:
            # A stitch first trained while LoRA B was still zero scored nothing: give it another turn.
            stitch = unscored[0]
        else:
            p = torch.tensor(self.probabilities, dtype=torch.float64)
            stitch = int(torch.multinomial(p, 1, generator=self.generator))
        self.counts[stitch] += 1
        return stitch

    def update_loss(self, stitch: int, loss: float) -> None:
        """Fold this step's training loss into the running loss of `stitch`; in `loss-gap` mode, the importance of
        every stitch is then how far its running loss lies above the frontier of the cheaper stitches."""
        previous = self.losses[stitch]
        self.losses[stitch] = loss if previous is None else self.ema * previous + (1 - self.ema) * loss
        if self.mode != "loss-gap":
            return
        self.scored[stitch] = True
        for k, own in enumerate(self.losses):
            cheaper = [
                other
                for t, other in enumerate(self.losses)
                if t != k and other is not None and self.costs[t] <= self.costs[k]
            ]
            self.importance[k] = max(0.0, own - min(cheaper)) if own is not None and cheaper else 0.0

    def update(self, stitch: int, parameters: Iterable[torch.nn.Parameter]) -> float:
        """Fold the SNIP saliency of this step's gradients into the importance of `stitch`; returns the saliency."""
        used = [p for p in parameters if p.grad is not None]
        sums = [(p.detach() * p.grad.detach()).abs().sum() for p in used]
        values: list[float] = []
        if sums:
            # One device-to-host copy for all of them, not one sync per parameter; promoting the dtypes is exact.
            dtype = functools.reduce(torch.promote_types, (s.dtype for s in sums))
            values = torch.stack([s.to(sums[0].device, dtype) for s in sums]).cpu().tolist()
        total = 0.0
        for value in values:  # in order, as plain floats (not `sum`, which compensates from Python 3.12 on)
            total += value
        count = sum(p.numel() for p in used)
        saliency = total / count if count else 0.0
        if not math.isfinite(saliency):
            raise FloatingPointError(f"Saliency of stitch {stitch} is {saliency}: the gradients hold NaN or inf.")
        if self.scored[stitch] and saliency > 0:
            self.importance[stitch] = self.ema * self.importance[stitch] + (1 - self.ema) * saliency
        elif saliency > 0:
            self.importance[stitch] = saliency  # the first non-zero score starts the average
            self.scored[stitch] = True
        return saliency

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "importance": list(self.importance),
            "scored": list(self.scored),
            "counts": list(self.counts),
            "losses": list(self.losses),
            "generator": self.generator.get_state().tolist(),
            "num_stitches": self.num_stitches,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_stitches"] != self.num_stitches:
            raise ValueError(
                f"Sampler state is for {state['num_stitches']} stitches but this palette has {self.num_stitches}: "
                "resume from a checkpoint of the same palette."
            )
        self.importance = list(state["importance"])
        self.scored = list(state["scored"])
        self.counts = list(state["counts"])
        self.losses = list(state.get("losses", [None] * self.num_stitches))  # absent from older checkpoints
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class StitchSamplerCallback(TrainerCallback, ExportableState):
    """The trainer's `StitchSampler` and the stitch of every optimizer step so far (`history`).

    As an `ExportableState`, `Trainer` writes `state()` into every checkpoint's `trainer_state.json`
    (`stateful_callbacks["StitchSamplerCallback"]`): `args` rebuild the sampler, `attributes` restore it
    (`ExportableState.from_state`). The constructor takes the arguments of `StitchSampler`.
    """

    def __init__(self, num_stitches: int, **sampler_args: Any) -> None:
        # JSON-ready copies: `state()["args"]` rebuild the sampler through `from_state`.
        sampler_args = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in sampler_args.items()}
        self.sampler_args = {"num_stitches": num_stitches, **sampler_args}
        self.sampler = StitchSampler(**self.sampler_args)
        self.history: list[int] = []

    @property
    def sampler_state(self) -> dict:
        """`StitchSampler.state_dict()`; setting it loads it (this is how `from_state` restores the sampler)."""
        return self.sampler.state_dict()

    @sampler_state.setter
    def sampler_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def state(self) -> dict:
        return {
            "args": dict(self.sampler_args),
            "attributes": {"sampler_state": self.sampler_state, "history": list(self.history)},
        }

    def load_state(self, state: dict) -> None:
        """Restore the `attributes` of `state()` into this callback, keeping its own sampler settings."""
        for name, value in state["attributes"].items():
            setattr(self, name, value)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A run resumed from a checkpoint written before the sampler was a callback has no entry for it, and
        # `Trainer._save_checkpoint` only updates existing entries: add it, so the next checkpoint holds it.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def select_stitches_to_deploy(costs: list[float], importance: list[float], intervals: int) -> list[int]:
    """One-stage deployment: split the cost range into `intervals` equal parts, keep the most important stitch
    of each non-empty part, plus both anchors (the first and last stitch)."""
    lo, hi = min(costs), max(costs)
    width = (hi - lo) / intervals or 1.0
    best: dict[int, int] = {}
    for k, cost in enumerate(costs):
        part = min(int((cost - lo) / width), intervals - 1)
        if part not in best or importance[k] > importance[best[part]]:
            best[part] = k
    return sorted({0, len(costs) - 1, *best.values()})

"""One rank of a 2-process CPU (gloo) StitchTrainer run, launched by tests/test_distributed.py:

    HF_HUB_OFFLINE=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/distributed_worker.py --out DIR

Every rank builds the same seeded tiny palette, trains it with importance sampling and gradient accumulation,
checkpoints into `DIR/train`, and writes what it saw to `DIR/rank{R}.json` (plus its final trainable weights to
`DIR/rank{R}.safetensors`): the stitch of every optimizer step and of every micro-batch, the sampler state after
every step, hashes of its trainable weights, and every file it wrote under `DIR/train` (so the test can tell
whether a checkpoint file was written by more than one rank, or twice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/conftest.py helpers

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.serialization  # noqa: E402
from conftest import VOCAB, build_palette, record_stitches  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback, default_data_collator  # noqa: E402

from stitched_llama.modeling_stitched_llama import stitch_of_bias  # noqa: E402
from stitched_llama.trainer import StitchTrainer, StitchTrainingArguments  # noqa: E402

MAX_STEPS = 8
SAVE_STEPS = 4
GRAD_ACCUM = 2


class WriteLog:
    """Every file this process writes under `root`, as (path relative to root, how), in order.

    Python-level writes are seen through the `open`/`os.replace`/`os.rename` audit events; `torch.save` and
    safetensors write from C++/Rust, so their entry points are wrapped (nested events are not counted twice).
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.entries: list[tuple[str, str]] = []
        self._inside = threading.local()
        sys.addaudithook(self._audit)
        self._wrap(
            safetensors.torch, "serialize_file", lambda args, kwargs: args[1] if len(args) > 1 else kwargs["filename"]
        )
        self._wrap(torch.serialization, "_open_zipfile_writer", lambda args, kwargs: args[0])

    def _record(self, path, how: str) -> None:
        if isinstance(path, int) or path is None:
            return
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if full == self.root or full.startswith(self.root + os.sep):
            self.entries.append((os.path.relpath(full, self.root), how))

    def _audit(self, event: str, args: tuple) -> None:
        if getattr(self._inside, "depth", 0):
            return
        if event == "open":
            path, mode, flags = args
            writing = (
                any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            )
            if writing:
                self._record(path, "open")
        elif event in ("os.replace", "os.rename"):
            self._record(args[1], event)

    def _wrap(self, module, name: str, path_of) -> None:
        original = getattr(module, name)
        log = self

        def wrapper(*args, **kwargs):
            path = path_of(args, kwargs)
            if isinstance(path, (str, os.PathLike)):
                log._record(path, f"{module.__name__}.{name}")
            log._inside.depth = getattr(log._inside, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                log._inside.depth -= 1

        setattr(module, name, wrapper)


def dataset(n=48, length=12, seed=0):
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


class Recorder(TrainerCallback):
    """What this rank saw at the end of every optimizer step (before that step's checkpoint is written)."""

    def __init__(self, trainer: StitchTrainer) -> None:
        self.trainer, self.steps = trainer, []
        self.previous = trainable_state(trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        sampler = self.trainer.sampler
        current = trainable_state(self.trainer.model)
        # stitches whose own biases this step changed (DDP must not move the biases of stitches not trained)
        moved = {
            stitch_of_bias(n)
            for n, t in current.items()
            if stitch_of_bias(n) is not None and not torch.equal(t, self.previous[n])
        }
        self.previous = current
        self.steps.append(
            {
                "global_step": state.global_step,
                "stitch": self.trainer._step_stitch,
                "sampler": sampler.state_dict(),
                "probabilities": sampler.probabilities,
                "history": list(self.trainer.stitch_history),
                "weights": digest(current),
                "biases_moved": sorted(moved),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    train_dir = os.path.join(out, "train")
    os.makedirs(train_dir, exist_ok=True)
    writes = WriteLog(train_dir)

    palette, _ = build_palette("llama")
    micro_batch_stitches = record_stitches(palette)
    args = StitchTrainingArguments(
        output_dir=train_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=5e-3,
        sampling="importance",
        logging_steps=2,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,  # a rank stuck in a collective fails the run instead of hanging it
        disable_tqdm=True,
        seed=0,
        lora_r=4,
    )
    trainer = StitchTrainer(model=palette, args=args, train_dataset=dataset(), data_collator=default_data_collator)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)

    save_calls: list[dict] = []
    original_save = trainer._save

    def recording_save(output_dir=None, state_dict=None):
        before = len(writes.entries)
        original_save(output_dir, state_dict)
        rel = os.path.relpath(os.path.realpath(output_dir or args.output_dir), writes.root)
        save_calls.append({"output_dir": rel, "files_written": [p for p, _ in writes.entries[before:]]})

    trainer._save = recording_save
    initial = digest({n: p.detach() for n, p in trainer.model.state_dict().items()})

    trainer.train()

    rank = dist.get_rank()
    final = trainable_state(trainer.model)
    safetensors.torch.save_file(final, os.path.join(out, f"rank{rank}.safetensors"))
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "process_index": trainer.args.process_index,
        "args_world_size": trainer.args.world_size,
        "should_save": trainer.args.should_save,
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "initial_state": initial,
        "stitch_history": trainer.stitch_history,
        "micro_batch_stitches": micro_batch_stitches,
        "steps": recorder.steps,
        "sampler": trainer.sampler.state_dict(),
        "importance": trainer.sampler.importance,
        "counts": trainer.sampler.counts,
        "probabilities": trainer.sampler.probabilities,
        "deployed_stitches": trainer.palette.config.deployed_stitches,
        "final_weights": digest(final),
        "save_calls": save_calls,
        "writes": writes.entries,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

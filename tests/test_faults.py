"""Faults that must lose nothing: failed saves, NaN weights, damaged checkpoints, kills during a save."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_palette, prompt
from safetensors.torch import load_file
from test_trainer import make_trainer
from transformers import TrainerCallback

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.checkpoint import last_complete_checkpoint, verify_checkpoint

HERE = Path(__file__).resolve().parent


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_save_that_fails_halfway_leaves_the_previous_save_intact(tmp_path, monkeypatch):
    palette, _ = build_palette("llama")
    folder = tmp_path / "palette"
    palette.save_pretrained(folder)
    before = digest(folder)
    palette.set_stitch(1)  # the next save would change config.json
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match=f"Could not save the palette to {folder}"):
        palette.save_pretrained(folder)
    assert digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["palette"]  # no staging folder left behind
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)
    assert StitchedLlamaForCausalLM.from_pretrained(folder).active_stitch == palette.num_stitches - 1


def test_a_save_replaces_the_previous_one_whole(tmp_path):
    palette, _ = build_palette("llama")
    folder = tmp_path / "palette"
    (folder / "stale").mkdir(parents=True)  # a folder holding more than a save keeps its other entries
    palette.save_pretrained(folder)
    palette.set_stitch(1)
    palette.save_pretrained(folder)
    assert (folder / "stale").is_dir()
    loaded = StitchedLlamaForCausalLM.from_pretrained(folder)
    assert loaded.active_stitch == 1
    other = tmp_path / "plain"
    palette.save_pretrained(other)
    palette.set_stitch(2)
    palette.save_pretrained(other)
    assert StitchedLlamaForCausalLM.from_pretrained(other).active_stitch == 2


def test_a_nan_weight_is_refused_before_anything_is_written(tmp_path):
    palette, _ = build_palette("llama")
    folder = tmp_path / "palette"
    palette.save_pretrained(folder)
    before = digest(folder)
    palette.add_stitch_biases(["q_proj"])
    with torch.no_grad():
        next(iter(palette.stitch_bias_parameters(1).values())).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"\.stitch_bias\.1 \(the bias of stitch 1\)"):
        palette.save_pretrained(folder)
    assert digest(folder) == before


def test_a_nan_in_a_stitch_bias_stops_training_before_the_next_checkpoint(tmp_path):
    class Poison(TrainerCallback):
        """NaN into stitch 2's bias after the step-4 update, before that step's checkpoint."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                with torch.no_grad():
                    bias = next(p for n, p in model.named_parameters() if n.endswith(".stitch_bias.2"))
                    bias.fill_(float("nan"))

    trainer = make_trainer(tmp_path, callbacks=[Poison()], max_steps=8, save_strategy="steps", save_steps=2)
    with pytest.raises(FloatingPointError, match=r"\.stitch_bias\.2 \(the bias of stitch 2\)"):
        trainer.train()
    newest = last_complete_checkpoint(str(tmp_path))
    assert newest == str(tmp_path / "checkpoint-2")
    for name, tensor in load_file(os.path.join(newest, "stitch_trainable.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


def test_a_truncated_checkpoint_is_skipped_on_resume(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer.train()
    assert verify_checkpoint(str(tmp_path / "checkpoint-6")) is None
    adapter = tmp_path / "checkpoint-6" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated on disk
    assert "adapter_model.safetensors does not match" in verify_checkpoint(str(tmp_path / "checkpoint-6"))
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    resumed = make_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    with pytest.raises(OSError, match="adapter_model.safetensors does not match"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    resumed = make_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-3, on to step 6
    assert resumed.state.global_step == 6 and len(resumed.stitch_history) == 6


def test_a_truncated_palette_file_is_an_oserror_naming_it(tmp_path):
    palette, _ = build_palette("llama")
    palette.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="model.safetensors"):
        StitchedLlamaForCausalLM.from_pretrained(tmp_path)


KILLER = """
import os, random, signal, sys, threading, time
sys.path.insert(0, {tests!r})
from transformers import TrainerCallback
from test_trainer import make_trainer

# SIGKILL this process a seeded random time after step 4 ends, while checkpoint-4 is being written (the save takes
# about {save_seconds:.3f} s); step 5 then waits, so that the kill always lands before training could finish.
class Killer(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            delay = random.Random({seed}).uniform(0, 1.2 * {save_seconds})
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if state.global_step == 5:
            time.sleep(60)

trainer = make_trainer(__import__("pathlib").Path({out!r}), callbacks=[Killer()], max_steps=6, save_strategy="steps", save_steps=2)
trainer.train()
"""


class SaveTimer(TrainerCallback):
    """How long the checkpoint of step 4 takes to write: from the end of the step to `on_save`."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            self.start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            self.seconds = time.perf_counter() - self.start


@pytest.mark.parametrize("seed", range(5))
def test_killed_at_a_random_point_of_a_checkpoint_write_then_resumed_exactly(tmp_path, seed):
    timer = SaveTimer()
    straight = make_trainer(tmp_path / "straight", callbacks=[timer], max_steps=6, save_strategy="steps", save_steps=2)
    straight.train()
    out = tmp_path / "killed"
    script = KILLER.format(tests=str(HERE), seed=seed, save_seconds=timer.seconds, out=str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    # Wherever the kill landed, the newest complete checkpoint is a whole one: 4 if its write finished, else 2.
    newest = last_complete_checkpoint(str(out))
    assert newest in (str(out / "checkpoint-2"), str(out / "checkpoint-4"))
    assert verify_checkpoint(newest) is None
    resumed = make_trainer(out, max_steps=6, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.stitch_history == straight.stitch_history
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    with torch.no_grad():
        ids = prompt()
        torch.testing.assert_close(straight.model(ids, stitch=1).logits, resumed.model(ids, stitch=1).logits)

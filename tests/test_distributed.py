"""StitchTrainer under real data parallelism: 2 CPU processes (gloo) launched with `accelerate launch`.

The ranks must train the same stitch at every optimizer step (docs/training.md), keep identical importance
statistics and weights, and only rank 0 may write the checkpoint (each file once; the one per-rank file
Transformers itself writes, `rng_state_{rank}.pth`, is the only thing rank 1 may put there).
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from stitched_llama.checkpoint import MANIFEST, last_complete_checkpoint
from stitched_llama.trainer import TRAINABLE_EXTRAS

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
WORLD_SIZE = 2
MAX_STEPS, SAVE_STEPS, GRAD_ACCUM = 8, 4, 2  # as in distributed_worker.py
SAVE_AT = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    TRAINABLE_EXTRAS,
    MANIFEST,  # written by rank 0 once the rest is complete
    "trainer_state.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    *(f"rng_state_{r}.pth" for r in range(WORLD_SIZE)),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_missing() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the 2-rank run once; return (output folder, [rank 0 record, rank 1 record])."""
    reason = _gloo_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # 2 ranks share the cores; more threads only oversubscribe them
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
    }
    # The command docs/training.md gives for CPUs: `--multi_gpu` makes accelerate start the processes (with
    # `--num_processes` alone it silently starts one), and the script's `use_cpu=True` makes them gloo CPU ranks.
    port = _free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD_SIZE}"]
    cmd += [f"--main_process_port={port}", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    cmd += [str(WORKER), "--out", str(out)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        output, _ = proc.communicate()
        pytest.fail(f"2-rank run did not finish in 300 s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"2-rank run failed (exit {proc.returncode}):\n{output[-6000:]}"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return out, records


def test_it_really_ran_data_parallel(run):
    _, records = run
    for rank, rec in enumerate(records):
        assert rec["rank"] == rec["process_index"] == rank
        assert rec["world_size"] == rec["args_world_size"] == WORLD_SIZE
        assert rec["backend"] == "gloo"
        assert rec["wrapped_model"] == "DistributedDataParallel"
        assert rec["should_save"] == (rank == 0)
    assert records[0]["initial_state"] == records[1]["initial_state"]  # the same seeded palette on both ranks


def test_every_rank_trains_the_same_stitch_at_every_step(run):
    _, (r0, r1) = run
    history = r0["stitch_history"]
    assert len(history) == MAX_STEPS
    assert r1["stitch_history"] == history
    for rec in (r0, r1):
        assert [s["global_step"] for s in rec["steps"]] == list(range(1, MAX_STEPS + 1))
        assert [s["stitch"] for s in rec["steps"]] == history
        # every micro-batch of a step, on every rank, ran that step's stitch
        assert rec["micro_batch_stitches"] == [s for s in history for _ in range(GRAD_ACCUM)]
        # and only that stitch's own biases moved (DDP leaves the other stitches' gradients empty)
        assert [s["biases_moved"] for s in rec["steps"]] == [[s] for s in history]


def test_importance_statistics_agree(run):
    _, (r0, r1) = run
    for a, b in zip(r0["steps"], r1["steps"], strict=True):
        step = a["global_step"]
        assert a["sampler"]["counts"] == b["sampler"]["counts"], step
        assert a["sampler"]["scored"] == b["sampler"]["scored"], step
        assert a["sampler"]["generator"] == b["sampler"]["generator"], step  # the same draws to come
        assert a["sampler"]["importance"] == pytest.approx(b["sampler"]["importance"], rel=1e-6, abs=0), step
        assert a["probabilities"] == pytest.approx(b["probabilities"], rel=1e-6, abs=0), step
    assert r0["counts"] == r1["counts"] == [r0["stitch_history"].count(k) for k in range(len(r0["counts"]))]
    assert r0["importance"] == pytest.approx(r1["importance"], rel=1e-6, abs=0)
    assert r0["probabilities"] == pytest.approx(r1["probabilities"], rel=1e-6, abs=0)
    assert r0["deployed_stitches"] == r1["deployed_stitches"]
    # the run got past warm-up: the last steps were drawn from non-uniform importance probabilities
    assert all(r0["sampler"]["scored"])
    assert max(r0["probabilities"]) - min(r0["probabilities"]) > 1e-3


def test_weights_agree_across_ranks(run):
    out, (r0, r1) = run
    assert [s["weights"] for s in r0["steps"]] == [s["weights"] for s in r1["steps"]]
    assert r0["final_weights"] == r1["final_weights"]
    assert len({s["weights"] for s in r0["steps"]}) == MAX_STEPS  # every step moved them
    w0, w1 = (load_file(out / f"rank{r}.safetensors") for r in range(WORLD_SIZE))
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name


def test_rank_zero_writes_each_checkpoint_once(run):
    out, (r0, r1) = run
    train = out / "train"
    assert sorted(p.name for p in train.iterdir() if p.is_dir()) == [f"checkpoint-{n}" for n in SAVE_AT]
    assert last_complete_checkpoint(str(train)) == str(train / f"checkpoint-{MAX_STEPS}")

    # rank 0 saved the model once per save step; rank 1's `_save` calls (Trainer makes them) wrote nothing
    assert [c["output_dir"] for c in r0["save_calls"]] == [f"checkpoint-{n}" for n in SAVE_AT]
    assert all(c["files_written"] for c in r0["save_calls"])
    assert all(not c["files_written"] for c in r1["save_calls"])
    # the only files rank 1 wrote are its own RNG states, once per checkpoint
    assert [path for path, _ in r1["writes"]] == [f"checkpoint-{n}/rng_state_1.pth" for n in SAVE_AT]

    writers = collections.defaultdict(list)
    for rec in (r0, r1):
        for path, how in rec["writes"]:
            writers[path].append((rec["rank"], how))
    on_disk = {p.relative_to(train).as_posix() for p in train.rglob("*") if p.is_file()}
    for path in on_disk:
        assert len(writers[path]) == 1, f"{path} written {len(writers[path])} times: {writers[path]}"
    assert all(len(w) == 1 for w in writers.values()), {p: w for p, w in writers.items() if len(w) > 1}
    assert not [p for p in on_disk if p.endswith(".tmp")]

    by_rank = {r0["rank"]: r0, r1["rank"]: r1}
    for n in SAVE_AT:
        folder = train / f"checkpoint-{n}"
        files = {p.name for p in folder.iterdir()}
        assert CHECKPOINT_FILES <= files, sorted(CHECKPOINT_FILES - files)
        trainer_state = json.loads((folder / "trainer_state.json").read_text())
        assert trainer_state["global_step"] == n
        # the sampler state saved (by Transformers, as the callback's state) is the one every rank had after step n
        attributes = trainer_state["stateful_callbacks"]["StitchSamplerCallback"]["attributes"]
        saved = attributes["sampler_state"]
        for rec in by_rank.values():
            at_step = rec["steps"][n - 1]
            assert attributes["history"] == rec["stitch_history"][:n] == at_step["history"]
            assert saved["counts"] == at_step["sampler"]["counts"]
            assert saved["generator"] == at_step["sampler"]["generator"]
            assert saved["importance"] == pytest.approx(at_step["sampler"]["importance"], rel=1e-6, abs=0)

    # the last checkpoint's stitch biases are the weights both ranks ended with
    extras = load_file(train / f"checkpoint-{MAX_STEPS}" / TRAINABLE_EXTRAS)
    final = load_file(out / "rank0.safetensors")
    assert extras and extras.keys() <= final.keys()
    for name, tensor in extras.items():
        assert torch.equal(tensor, final[name]), name

    # the deployment report is written by rank 0 alone, too
    assert [rank for rank, _ in writers["esta_report.json"]] == [0]

"""StitchTrainer on tiny anchors: what trains, what stays frozen, sampling, exact resume, deployment."""

import inspect
import json
import logging
import os

import pytest
import torch
from conftest import VOCAB, build_palette, prompt, record_stitches
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from stitched_llama.checkpoint import last_complete_checkpoint, write_manifest
from stitched_llama.modeling_stitched_llama import stitch_of_bias
from stitched_llama.sampler import StitchSampler, StitchSamplerCallback, select_stitches_to_deploy
from stitched_llama.trainer import REPORT, SAMPLER_STATE, StitchTrainer, StitchTrainingArguments


def dataset(n=48, length=12, seed=0):
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        lora_r=4,
    )
    return StitchTrainingArguments(**{**defaults, **kwargs})


def make_trainer(tmp_path, palette=None, callbacks=(), **kwargs):
    palette = palette if palette is not None else build_palette("llama")[0]
    return StitchTrainer(
        model=palette,
        args=make_args(tmp_path, **kwargs),
        train_dataset=dataset(),
        eval_dataset=dataset(8, seed=1),
        data_collator=default_data_collator,
        callbacks=list(callbacks),
    )


class Snapshots(TrainerCallback):
    """Copies of the trainable parameters after every optimizer step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})


def test_training_changes_only_what_it_should(tmp_path):
    palette, (small, large) = build_palette("llama")
    trainer = make_trainer(tmp_path, palette=palette, max_steps=12)
    snapshots = Snapshots(trainer.model)
    trainer.add_callback(snapshots)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    history = trainer.stitch_history
    assert len(history) == 12

    # the anchors are untouched (the stitch biases on their linears are the palette's)
    for name, tensor in palette.small.state_dict().items():
        if "lora_" not in name and stitch_of_bias(name) is None:
            assert torch.equal(tensor, small.state_dict()[name.replace(".base_layer", "")]), name
    for name, tensor in palette.large.state_dict().items():
        if "lora_" not in name and stitch_of_bias(name) is None:
            assert torch.equal(tensor, large.state_dict()[name.replace(".base_layer", "")]), name

    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, initial[n])}
    assert any("lora_B" in n and "stitch_layers" in n for n in changed)
    assert any("lora_B" in n and "small.model.layers" in n for n in changed)
    assert not any("lora_" not in n and stitch_of_bias(n) is None for n in changed)
    for k in range(palette.num_stitches):
        moved = any(stitch_of_bias(n) == k for n in changed)
        assert moved == (k in history), k

    # a stitch's biases move only on the steps that sampled it
    previous = {n: initial[n] for n in snapshots.steps[0]}
    for step, (stitch, params) in enumerate(zip(history, snapshots.steps)):
        for name, value in params.items():
            if stitch_of_bias(name) not in (None, stitch):
                assert torch.equal(value, previous[name]), (step, name)
        previous = params


def test_every_micro_batch_of_a_step_uses_the_steps_stitch(tmp_path):
    palette, _ = build_palette("llama")
    seen = record_stitches(palette)
    trainer = make_trainer(tmp_path, palette=palette, max_steps=6, gradient_accumulation_steps=3)
    trainer.train()
    assert len(seen) == 18
    assert seen == [s for s in trainer.stitch_history for _ in range(3)]


def test_probabilities_leave_uniform_after_warmup(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=24, importance_temperature=0.5)
    trainer.train()
    k = trainer.palette.num_stitches
    assert trainer.stitch_history[:k] == list(range(k))  # warm-up visits each stitch in turn
    probabilities = trainer.sampler.probabilities
    assert all(trainer.sampler.scored)
    assert max(probabilities) - min(probabilities) > 1e-3
    assert sum(probabilities) == pytest.approx(1.0)
    assert min(probabilities) >= trainer.args.importance_eps / k - 1e-9


def test_uniform_sampling_stays_uniform(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, sampling="uniform")
    trainer.train()
    assert trainer.sampler.probabilities == [1 / trainer.palette.num_stitches] * trainer.palette.num_stitches
    assert any(i > 0 for i in trainer.sampler.importance)  # scored all the same, for deployment


def final_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a", max_steps=12)
    straight.train()

    first = make_trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=5)
    first.train()
    # resume from step 5 with a fresh trainer and a fresh copy of the same palette
    resumed = make_trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))

    assert resumed.stitch_history == straight.stitch_history
    assert resumed.sampler.importance == pytest.approx(straight.sampler.importance, rel=1e-6)
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_trained_stitching_layers_move_and_resume_exactly(tmp_path):
    palette, (small, _) = build_palette("llama")
    before = {n: p.detach().clone() for n, p in palette.stitch_layers.named_parameters()}
    straight = make_trainer(tmp_path / "a", palette=palette, max_steps=12, train_stitch_layers=True)
    straight.train()
    moved = {n for n, p in palette.stitch_layers.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == set(before)  # each P_n's weight and bias (stitch biases came after `before`)
    assert torch.equal(palette.small.model.layers[0].mlp.up_proj.weight, small.model.layers[0].mlp.up_proj.weight)

    make_trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=5, train_stitch_layers=True).train()
    resumed = make_trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=5, train_stitch_layers=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys() and any(n.endswith(f"stitch_layers.{key}.weight") for n in a for key in ("1", "2"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    trainer = make_trainer(tmp_path, callbacks=[Poison()], max_steps=10, save_strategy="steps", save_steps=3)
    # The poisoned tensor is named whether or not the step's stitch runs it (then its loss is finite).
    with pytest.raises(
        FloatingPointError, match=r"Trainable tensor \S+lora_B\S+ holds NaN or inf at step \d+ \(stitch \d+"
    ):
        trainer.train()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    # an interrupted later checkpoint (no sampler state) is skipped
    os.makedirs(tmp_path / "checkpoint-9")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")


def test_evaluation_and_deployment_report(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, num_deployed_stitches=2)
    trainer.train()
    metrics = trainer.evaluate()
    k = trainer.palette.num_stitches
    for i in range(k):
        assert metrics[f"eval_stitch{i}_perplexity"] == pytest.approx(
            torch.tensor(metrics[f"eval_stitch{i}_loss"]).exp().item(), rel=1e-4
        )
    deployed = trainer.deploy()
    assert deployed[0] == 0 and deployed[-1] == k - 1 and len(deployed) <= 4
    assert trainer.palette.config.deployed_stitches == deployed
    report = json.loads((tmp_path / "esta_report.json").read_text())
    assert report["deployed_stitches"] == deployed
    assert [row["stitch"] for row in report["stitches"]] == list(range(k))
    assert all("eval_loss" in row and "flops_per_token" in row for row in report["stitches"])


def test_snnet_full_trains_the_anchors(tmp_path):
    palette, (small, _) = build_palette("llama")
    trainer = make_trainer(tmp_path, palette=palette, method="snnet-full", max_steps=4)
    assert trainer.sampler.mode == "uniform"
    trainer.train()
    assert not torch.equal(palette.small.model.layers[0].mlp.up_proj.weight, small.model.layers[0].mlp.up_proj.weight)


def test_sampler_state_round_trip_and_errors():
    a = StitchSampler(5, seed=3, warmup_steps=0)
    a.importance, a.scored = [1.0, 2.0, 3.0, 0.5, 1.5], [True] * 5
    b = StitchSampler(5, seed=99, warmup_steps=0)
    b.load_state_dict(a.state_dict())
    assert [a.sample(i) for i in range(20)] == [b.sample(i) for i in range(20)]
    with pytest.raises(ValueError, match="for 5 stitches"):
        StitchSampler(4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="eps=2"):
        StitchSampler(3, eps=2)
    with pytest.raises(ValueError, match="Unknown method"):
        StitchTrainingArguments(output_dir="x", method="full", report_to=[])


def test_stitch_weights_set_each_trained_stitch_s_share_of_uniform_sampling(tmp_path):
    trainer = make_trainer(tmp_path, sampling="uniform", train_stitches="3,1", stitch_weights="3,1")
    n = trainer.palette.num_stitches
    assert n > 3
    expected = [0.0] * n
    expected[1], expected[3] = 0.25, 0.75  # shares in train_stitches' order: stitch 3 gets 3 of 4 parts
    assert trainer.sampler.probabilities == pytest.approx(expected)
    draws = [trainer.sampler.sample(i) for i in range(4000)]
    assert set(draws) == {1, 3} and draws.count(3) / len(draws) == pytest.approx(0.75, abs=0.03)
    # The shares travel with the sampler's arguments in every checkpoint, so a resumed run keeps them.
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StitchSamplerCallback))
    again = StitchSamplerCallback.from_state(json.loads(json.dumps(callback.state())))
    assert again.sampler.probabilities == pytest.approx(expected)
    assert [again.sampler.sample(i) for i in range(50)] == [callback.sampler.sample(i) for i in range(50)]
    with pytest.raises(ValueError, match="names a stitch twice"):
        make_args(tmp_path, sampling="uniform", train_stitches="1,-1", stitch_weights="1,1").sampling_weights(2)
    with pytest.raises(ValueError, match=f"2 shares for a palette of {n}"):
        make_args(tmp_path, sampling="uniform", stitch_weights="1,1").sampling_weights(n)
    with pytest.raises(ValueError, match="mode='importance' learns them"):
        StitchSampler(3, mode="importance", weights=[1, 1, 1])


def test_training_arguments_keep_transformers_positional_order():
    # Our options are keyword-only: the first positional argument is still TrainingArguments' output_dir.
    args = StitchTrainingArguments("run-dir", report_to=[], sampling="uniform")
    assert (args.output_dir, args.sampling, args.method) == ("run-dir", "uniform", "esta")
    ours = inspect.signature(StitchTrainingArguments).parameters.values()
    positional = [p.name for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(inspect.signature(TrainingArguments).parameters)


def test_deployment_picks_the_most_important_per_cost_interval():
    costs = [1, 2, 3, 4, 5, 6, 7, 10]
    importance = [0, 5, 1, 0, 9, 2, 1, 0]
    # parts of width 3: costs 1-3 -> stitch 1, 4-6 -> stitch 4, 7-10 -> stitch 6 (importance 1 beats 0)
    assert select_stitches_to_deploy(costs, importance, 3) == [0, 1, 4, 6, 7]


def test_sampler_draws_only_from_its_subset():
    sampler = StitchSampler(5, seed=0, stitches=[1, 3, 4])
    assert [sampler.sample(i) for i in range(3)] == [1, 3, 4]  # warm-up: the subset in turn
    sampler.importance, sampler.scored = [9.0, 1.0, 9.0, 2.0, 3.0], [True] * 5
    probabilities = sampler.probabilities
    assert probabilities[0] == probabilities[2] == 0.0 and sum(probabilities) == pytest.approx(1.0)
    assert {sampler.sample(i) for i in range(3, 60)} <= {1, 3, 4}
    assert {StitchSampler(5, stitches=[2]).sample(i) for i in range(10)} == {2}
    for bad in ([], [5], [-1], [1.0]):
        with pytest.raises(ValueError, match="must be a non-empty list of stitch indices in 0..4"):
            StitchSampler(5, stitches=bad)


def test_train_stitches_trains_that_stitch_alone(tmp_path):
    palette, _ = build_palette("llama")
    last = palette.num_stitches - 1
    trainer = make_trainer(tmp_path, palette=palette, max_steps=5, train_stitches="-1")
    trainer.train()
    assert trainer.stitch_history == [last] * 5
    assert trainer.sampler.counts == [0] * last + [5]
    with pytest.raises(ValueError, match=rf"'{last + 1}' is not a stitch index of this palette.*-{last + 1}..{last}"):
        make_trainer(tmp_path, train_stitches=f"0,{last + 1}")


def test_deploying_untrained_stitches_that_share_the_trained_lora_warns(tmp_path, caplog):
    from transformers.utils import logging as hf_logging

    palette, _ = build_palette("llama")
    last = palette.num_stitches - 1
    hybrid = next(k for k, s in enumerate(palette.config.stitches) if 0 < k < last and not s[2:])
    n, j = palette.config.stitches[hybrid][:2]
    runs: dict[str, list[int]] = {}
    hf_logging.enable_propagation()
    try:
        for trained in (str(last), str(hybrid)):
            caplog.clear()
            trainer = make_trainer(
                tmp_path / trained, palette=build_palette("llama")[0], max_steps=2, train_stitches=trained
            )
            with caplog.at_level(logging.WARNING):
                trainer.train()
            report = json.loads((tmp_path / trained / "esta_report.json").read_text())
            warned = [r.getMessage() for r in caplog.records if "were never trained" in r.getMessage()]
            runs[trained] = report["deployed_untrained_but_changed"]
            assert bool(warned) == bool(runs[trained]), (trained, warned)
    finally:
        hf_logging.disable_propagation()
    # The large anchor alone: the small anchor runs none of its layers, so it is unchanged; the hybrids run its last
    # layers, so they changed.
    assert runs[str(last)] and 0 not in runs[str(last)] and last not in runs[str(last)], runs
    # A hybrid: the small anchor runs its first small layers, the large anchor its last large layers.
    assert 0 in runs[str(hybrid)] and last in runs[str(hybrid)], (n, j, runs)


def test_a_palette_trained_on_its_hybrids_serves_its_anchors_unchanged_with_the_adapter_off(tmp_path):
    palette, (small, large) = build_palette("llama")
    last = palette.num_stitches - 1
    hybrids = ",".join(str(k) for k in range(1, last))
    trainer = make_trainer(tmp_path, palette=palette, max_steps=4, train_stitches=hybrids)
    trainer.train()
    model = trainer.model.eval()
    ids = prompt(batch=2)
    with torch.no_grad():
        for k, anchor in ((0, small), (last, large)):
            expected = anchor(ids).logits
            # The anchors run the LoRA the hybrids trained, so with the adapter on they changed ...
            adapted = model(input_ids=ids, stitch=k).logits
            assert not torch.allclose(adapted, expected, atol=1e-4), k
            # ... and peft's per-row adapter choice (`__base__`: none) gives them back exactly: their own stitch
            # biases were never trained. One row without the adapter, one with it, in the same batch.
            mixed = model(input_ids=ids, stitch=k, adapter_names=["__base__", "default"]).logits
            torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(mixed[1], adapted[1], rtol=1e-5, atol=1e-5)
            served = model.generate(
                input_ids=ids, stitch=k, adapter_names=["__base__"] * 2, max_new_tokens=6, do_sample=False
            )
            assert torch.equal(served, anchor.generate(input_ids=ids, max_new_tokens=6, do_sample=False)), k


def sampler_entry(checkpoint):
    """The sampler callback's state as Transformers stored it in the checkpoint's trainer_state.json."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["StitchSamplerCallback"]


def test_checkpoints_keep_the_sampler_in_trainer_state(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer.train()
    for step in (3, 6):
        checkpoint = tmp_path / f"checkpoint-{step}"
        entry = sampler_entry(checkpoint)
        assert entry["attributes"]["history"] == trainer.stitch_history[:step]
        assert sum(entry["attributes"]["sampler_state"]["counts"]) == step
        assert entry["args"]["num_stitches"] == trainer.palette.num_stitches
        assert not (checkpoint / SAMPLER_STATE).exists()  # the sampler has one home now
    final = trainer.sampler.state_dict()
    assert sampler_entry(tmp_path / "checkpoint-6")["attributes"]["sampler_state"] == json.loads(json.dumps(final))


def test_sampler_callback_state_round_trips_through_from_state():
    callback = StitchSamplerCallback(5, seed=3, warmup_steps=0, costs=[1, 2, 3, 4, 5])
    callback.sampler.importance, callback.sampler.scored = [1.0, 2.0, 3.0, 0.5, 1.5], [True] * 5
    callback.history = [callback.sampler.sample(i) for i in range(7)]
    again = StitchSamplerCallback.from_state(json.loads(json.dumps(callback.state())))  # as trainer_state.json does
    assert again.history == callback.history and again.sampler.state_dict() == callback.sampler.state_dict()
    assert [again.sampler.sample(i) for i in range(20)] == [callback.sampler.sample(i) for i in range(20)]


def as_older_checkpoint(checkpoint):
    """Rewrite a checkpoint into the layout of before the sampler was a callback: `stitch_sampler.json`."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    attributes = state["stateful_callbacks"].pop("StitchSamplerCallback")["attributes"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (checkpoint / SAMPLER_STATE).write_text(
        json.dumps({**attributes["sampler_state"], "history": attributes["history"]})
    )
    write_manifest(str(checkpoint))


@pytest.mark.parametrize("layout", ["older", "restore_callback_states"])
def test_resume_is_exact_from_an_older_checkpoint_and_with_restored_callbacks(tmp_path, layout):
    straight = make_trainer(tmp_path / "a", max_steps=6)
    straight.train()
    make_trainer(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3).train()
    os.rename(tmp_path / "b" / "checkpoint-6", tmp_path / "b" / "finished-6")  # the resumed run writes it anew
    extra = {}
    if layout == "older":
        as_older_checkpoint(tmp_path / "b" / "checkpoint-3")
    else:  # Transformers then rebuilds the callback from the checkpoint: the trainer must follow the new one
        extra["restore_callback_states_from_checkpoint"] = True
    resumed = make_trainer(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, **extra)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.stitch_history == straight.stitch_history
    a, b = resumed.sampler.state_dict(), straight.sampler.state_dict()
    assert a["counts"] == b["counts"] and a["generator"] == b["generator"] and a["scored"] == b["scored"]
    assert a["importance"] == pytest.approx(b["importance"], rel=1e-6)
    a, b = final_state(straight), final_state(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # the checkpoint written after resuming holds the sampler the new way
    assert sampler_entry(tmp_path / "b" / "checkpoint-6")["attributes"]["history"] == straight.stitch_history


def test_deployment_runs_once_and_a_later_evaluation_fills_the_report(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=4, num_deployed_stitches=2)
    calls = []
    deploy = trainer.deploy
    monkeypatch.setattr(trainer, "deploy", lambda: calls.append(1) or deploy())
    trainer.train()
    assert len(calls) == 1
    deployed = trainer.palette.config.deployed_stitches
    assert deployed and all("eval_loss" not in row for row in json.loads((tmp_path / REPORT).read_text())["stitches"])
    metrics = trainer.evaluate()
    assert len(calls) == 1  # no second deployment: the report follows the evaluation
    report = json.loads((tmp_path / REPORT).read_text())
    assert report["deployed_stitches"] == deployed == trainer.palette.config.deployed_stitches
    k = trainer.palette.num_stitches
    assert [row["eval_loss"] for row in report["stitches"]] == [metrics[f"eval_stitch{i}_loss"] for i in range(k)]
    assert trainer.palette.stitch_report["metrics"]["0"]["eval_loss"] == metrics["eval_stitch0_loss"]
    assert trainer.palette.stitch_report["importance"] == trainer.sampler.importance


def test_a_nan_loss_stops_training_naming_step_and_stitch(tmp_path):
    class Poison(TrainerCallback):
        """NaN into a frozen weight of the large anchor: its loss is NaN while every trainable tensor is finite."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    trainer.palette.large.model.norm.weight.fill_(float("nan"))

    trainer = make_trainer(tmp_path, max_steps=6, train_stitches="-1", save_strategy="steps", save_steps=2)
    trainer.add_callback(Poison())
    last = trainer.palette.num_stitches - 1
    with pytest.raises(FloatingPointError, match=rf"Loss is nan at step 2 \(stitch {last}\): training stopped"):
        trainer.train()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_last_complete_checkpoint_names_and_orders_as_transformers(tmp_path, caplog):
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-10.tmp", "checkpoint-x", "old-checkpoint-11"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(name.encode())
        write_manifest(str(tmp_path / name))
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint")
    assert (
        last_complete_checkpoint(str(tmp_path)) == get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    )
    (tmp_path / "checkpoint-10" / "weights.bin").write_bytes(b"damaged")
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-9")
    assert "Skipping checkpoint" in caplog.text and "checkpoint-10" in caplog.text

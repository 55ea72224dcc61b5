"""Distillation from the frozen large anchor: the loss against a hand-written KL, the teacher, the cache."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_palette, record_stitches
from test_trainer import dataset, make_args

from stitched_llama.distillation import TeacherCache, distillation_loss, teacher_topk
from stitched_llama.trainer import StitchTrainer


def trainer_for(tmp_path, palette=None, **kwargs):
    palette = palette if palette is not None else build_palette("llama")[0]
    return StitchTrainer(model=palette, args=make_args(tmp_path, **kwargs), train_dataset=dataset())


def batch(n=3, length=12, pad=0):
    rows = dataset(n, length, seed=5)[:]
    inputs = {key: torch.tensor(value) for key, value in rows.items()}
    if pad:  # right padding, as the package's collators pad
        inputs["attention_mask"][0, -pad:] = 0
        inputs["labels"][0, -pad:] = -100
    return inputs


def reference_kd(student_logits, teacher_logits, labels, temperature):
    """KL(teacher || student) at `temperature`, times T^2, averaged over the scored next-token positions."""
    scored = labels[:, 1:] != -100
    t = F.log_softmax(teacher_logits[:, :-1] / temperature, -1)[scored]
    s = F.log_softmax(student_logits[:, :-1] / temperature, -1)[scored]
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def perturb_training(trainer):
    """Make LoRA B and the stitch biases non-zero, as some training would."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_alpha_zero_is_the_cross_entropy(tmp_path):
    trainer = trainer_for(tmp_path, distill_alpha=0.0)
    trainer.model.train()
    inputs = {**batch(), "stitch": 1}
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    expected = trainer.model(**inputs).loss
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixed_loss_matches_a_hand_written_kl_to_the_plain_large_anchor(tmp_path, temperature):
    palette, (_, large) = build_palette("llama")
    trainer = trainer_for(tmp_path, palette, distill_alpha=0.3, distill_temperature=temperature)
    perturb_training(trainer)  # so that the stitch differs from the teacher and the teacher must undo it
    trainer.model.train()
    inputs = batch(pad=4)
    loss = trainer.compute_loss(trainer.model, {**inputs, "stitch": 1})
    student = trainer.model(**inputs, stitch=1)
    with torch.no_grad():
        teacher_logits = large(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    kd = reference_kd(student.logits, teacher_logits, inputs["labels"], temperature)
    torch.testing.assert_close(loss, 0.7 * student.loss + 0.3 * kd, rtol=1e-5, atol=1e-6)


def test_the_large_anchor_stitch_trains_on_cross_entropy_alone(tmp_path):
    trainer = trainer_for(tmp_path, distill_alpha=0.8)
    perturb_training(trainer)
    trainer.model.train()
    inputs = {**batch(), "stitch": trainer.palette.num_stitches - 1}
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(inputs)), trainer.model(**inputs).loss)


def test_evaluation_loss_stays_cross_entropy(tmp_path):
    trainer = trainer_for(tmp_path, distill_alpha=0.5)
    perturb_training(trainer)
    trainer.model.eval()
    inputs = {**batch(), "stitch": 1}
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(inputs)), trainer.model(**inputs).loss)


def test_teacher_is_the_frozen_large_anchor_and_training_resumes_after_it(tmp_path):
    palette, (_, large) = build_palette("llama")
    trainer = trainer_for(tmp_path, palette, distill_alpha=0.5)
    perturb_training(trainer)
    inputs = batch(pad=2)
    ids, logprobs, teacher_ce = trainer._teacher(trainer.model, inputs)
    assert teacher_ce is None  # only loss_gap_reference='teacher' asks for it
    with torch.no_grad():
        plain = large(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logprobs, F.log_softmax(plain, -1), rtol=1e-5, atol=1e-5)
    assert ids is None  # the whole vocabulary, in order (distill_top_k=None)
    # Adapters and biases are back on afterwards: the trained large stitch differs from the plain anchor.
    after = trainer.model(**inputs, stitch=-1).logits
    assert not torch.allclose(after, plain, atol=1e-4)


def test_teacher_cache_gives_the_live_teachers_loss(tmp_path):
    live = trainer_for(tmp_path / "live", distill_alpha=0.5, distill_top_k=8)
    cached = trainer_for(tmp_path / "cached", distill_alpha=0.5, distill_top_k=8, distill_cache=True)
    for trainer in (live, cached):
        torch.manual_seed(0)
        perturb_training(trainer)
        trainer.model.train()
    inputs = {**batch(pad=3), "stitch": 1}
    expected = live.compute_loss(live.model, dict(inputs))
    first = cached.compute_loss(cached.model, dict(inputs))  # fills the cache
    assert len(cached.teacher_cache) == 3
    seen = record_stitches(cached.palette)
    flipped = {key: value.flip(0) if torch.is_tensor(value) else value for key, value in inputs.items()}
    second = cached.compute_loss(cached.model, flipped)  # same rows, another order
    assert seen == [1]  # the student only: the cache answered for the teacher
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)  # same rows, other order: same mean loss


def test_top_k_with_the_whole_vocabulary_is_the_full_distribution():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    student = torch.randn(2, 5, 11, requires_grad=True)
    ids, logprobs = teacher_topk(logits, 1.5, None)
    assert ids is None  # the whole vocabulary, in order: the loss skips the gather
    full = distillation_loss(student, ids, logprobs, labels, 1.5)
    (full_grad,) = torch.autograd.grad(full, student)
    all_k = distillation_loss(student, *teacher_topk(logits, 1.5, 11), labels, 1.5)
    (all_k_grad,) = torch.autograd.grad(all_k, student)
    torch.testing.assert_close(full, all_k)
    torch.testing.assert_close(full_grad, all_k_grad)
    torch.testing.assert_close(full, reference_kd(student, logits, labels, 1.5))
    assert distillation_loss(logits, *teacher_topk(logits, 1.0, None), labels) < 1e-6  # KL(p || p) = 0


def test_cache_needs_a_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TeacherCache(0)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(distill_alpha=1.5), "distill_alpha"),
        (dict(distill_alpha=0.5, distill_temperature=0.0), "distill_temperature"),
        (dict(distill_cache=True), "distill_top_k"),
        (dict(distill_alpha=0.5, method="snnet-full"), "frozen anchors"),
    ],
)
def test_bad_distillation_arguments_are_refused_when_built(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_args(tmp_path, **kwargs)


def test_training_with_distillation_runs_and_fills_the_cache(tmp_path):
    trainer = trainer_for(tmp_path, distill_alpha=0.5, distill_top_k=16, distill_cache=True, max_steps=6)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    hybrids = [k for k in trainer.stitch_history if k != trainer.palette.num_stitches - 1]
    assert hybrids and 0 < len(trainer.teacher_cache) <= len(dataset())

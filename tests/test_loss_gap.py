"""loss-gap sampling: importance from how far a stitch's running loss lies above the cheaper stitches' best."""

import copy
import math

import pytest
import torch
from conftest import build_palette
from test_trainer import dataset, make_args, make_trainer

from stitched_llama.sampler import StitchSampler


def test_importance_is_the_gap_above_the_cheaper_stitches():
    sampler = StitchSampler(4, mode="loss-gap", ema=0.0, costs=[1.0, 2.0, 3.0, 4.0], warmup_steps=0)
    for stitch, loss in enumerate([3.0, 2.5, 3.4, 1.0]):
        sampler.update_loss(stitch, loss)
    # stitch 0: nothing cheaper; 1: below 3.0; 2: 3.4 - min(3.0, 2.5); 3: below everything cheaper.
    assert sampler.importance == pytest.approx([0.0, 0.0, 0.9, 0.0])
    p = sampler.probabilities
    assert p[2] == max(p) and p[2] > 0.5 and min(p) >= sampler.eps / 4
    sampler.update_loss(2, 2.0)  # ema 0: the running loss is the new one, now on the frontier
    assert sampler.importance == pytest.approx([0.0, 0.0, 0.0, 0.0])


def test_running_losses_survive_the_state_round_trip():
    sampler = StitchSampler(3, mode="loss-gap", costs=[1, 2, 3])
    sampler.update_loss(1, 2.0)
    sampler.update_loss(1, 1.0)
    again = StitchSampler(3, mode="loss-gap", costs=[1, 2, 3])
    again.load_state_dict(sampler.state_dict())
    assert again.losses == pytest.approx([None, 0.9 * 2.0 + 0.1 * 1.0, None])


def test_loss_gap_needs_the_costs():
    with pytest.raises(ValueError, match="costs"):
        StitchSampler(3, mode="loss-gap")


def test_training_with_loss_gap_deploys_by_running_loss(tmp_path):
    trainer = make_trainer(tmp_path, sampling="loss-gap", max_steps=12, num_deployed_stitches=1)
    trainer.train()
    sampler = trainer.sampler
    assert all(loss is not None for loss in sampler.losses)  # the warm-up visited every stitch
    assert sorted(trainer.stitch_history[: sampler.num_stitches]) == list(range(sampler.num_stitches))
    # One interval: the deployed hybrid (if any) is the one with the lowest running loss, plus both anchors.
    deployed = trainer.palette.config.deployed_stitches
    middle = [k for k in deployed if 0 < k < sampler.num_stitches - 1]
    best = min(range(sampler.num_stitches), key=lambda k: sampler.losses[k])
    assert middle == ([best] if 0 < best < sampler.num_stitches - 1 else [])


def test_frontier_stitches_keep_their_uniform_share():
    sampler = StitchSampler(
        5, mode="loss-gap", ema=0.0, eps=0.2, costs=[1, 2, 3, 4, 5], warmup_steps=0, keep_frontier=True
    )
    for stitch, loss in enumerate([3.0, 3.6, 2.9, 3.2, 2.0]):
        sampler.update_loss(stitch, loss)
    # Gaps: 1 and 3 lie 0.6 and 0.3 above the cheaper stitches' best; 0, 2 and 4 are on the frontier.
    assert sampler.importance == pytest.approx([0.0, 0.6, 0.0, 0.3, 0.0])
    # Frontier: 1/5 each. The other 2/5 by gap: z = (+1, -1), softmax -> e/(e + 1/e), then the eps share.
    high = math.e / (math.e + 1 / math.e)
    expected = [0.2, 0.4 * (0.8 * high + 0.1), 0.2, 0.4 * (0.8 * (1 - high) + 0.1), 0.2]
    assert sampler.probabilities == pytest.approx(expected)
    sampler.keep_frontier = False  # the plain rule starves the frontier: each anchor gets less than 1/5
    assert sampler.probabilities[0] < 0.2 and sampler.probabilities[4] < 0.2


def test_a_frontier_without_stitches_below_it_is_uniform():
    sampler = StitchSampler(3, mode="loss-gap", ema=0.0, costs=[1, 2, 3], warmup_steps=0, keep_frontier=True)
    for stitch, loss in enumerate([3.0, 2.5, 2.0]):
        sampler.update_loss(stitch, loss)
    assert sampler.probabilities == pytest.approx([1 / 3] * 3)


def one_step(tmp_path, stitch, palette=None, **kwargs):
    """A loss-gap trainer that trains `stitch` for one step on the whole dataset as its one batch, and that batch;
    LoRA B and the biases still start at zero, so a plain forward gives the step's loss."""
    trainer = make_trainer(
        tmp_path,
        palette=palette,
        sampling="loss-gap",
        max_steps=1,
        train_stitches=str(stitch),
        per_device_train_batch_size=48,
        **kwargs,
    )
    return trainer, {key: torch.tensor(value) for key, value in dataset()[:].items()}


def test_with_distillation_the_running_loss_is_the_cross_entropy(tmp_path):
    # The large anchor trains on cross-entropy alone: stitches are compared on it, not on the mixed loss.
    trainer, inputs = one_step(tmp_path, 1, distill_alpha=0.5)
    with torch.no_grad():
        expected = trainer.model(**inputs, stitch=1).loss.item()
    trainer.train()
    assert trainer.sampler.losses[1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_the_teacher_reference_scores_the_cross_entropy_above_the_plain_large_anchor(tmp_path, alpha):
    palette, (_, large) = build_palette("llama")
    scores = {}
    for stitch in (1, palette.num_stitches - 1):
        trainer, inputs = one_step(
            tmp_path, stitch, copy.deepcopy(palette), loss_gap_reference="teacher", distill_alpha=alpha
        )
        with torch.no_grad():
            own = trainer.model(**inputs, stitch=stitch).loss.item()
            plain = large(**inputs).loss.item()
        trainer.train()
        scores[stitch] = trainer.sampler.losses[stitch]
        assert scores[stitch] == pytest.approx(own - plain, rel=1e-4, abs=1e-5)
    assert scores[palette.num_stitches - 1] == pytest.approx(0.0, abs=1e-5)  # untrained: the large anchor itself
    assert abs(scores[1]) > 1e-3  # the hybrid differs from it (by 0.013 nats on these random anchors)


def test_the_teacher_reference_cannot_read_the_teacher_cache(tmp_path):
    with pytest.raises(ValueError, match="distill_cache=False"):
        make_args(tmp_path, loss_gap_reference="teacher", distill_alpha=0.5, distill_top_k=4, distill_cache=True)

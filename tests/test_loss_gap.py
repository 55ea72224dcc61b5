"""loss-gap sampling: importance from how far a stitch's running loss lies above the cheaper stitches' best."""

import pytest
from test_trainer import make_trainer

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

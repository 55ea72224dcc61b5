import logging

import pytest
import torch
from conftest import VOCAB, make_pair

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.stitch_init import calibration_batches

CALIB = torch.randint(3, VOCAB, (12, 40), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_fit_equals_an_independent_least_squares_solve():
    """Solve the same problem from `output_hidden_states` of the plain anchors with torch.linalg.lstsq."""
    small, large = make_pair("llama")
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 2)], calibration=CALIB, ridge=0.0)
    hs = small(CALIB, output_hidden_states=True).hidden_states[1][:, 1:].reshape(-1, 32).double()
    hl = large(CALIB, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 48).double()
    x = torch.cat([hs, torch.ones(len(hs), 1, dtype=torch.float64)], dim=1)
    w = torch.linalg.lstsq(x, hl).solution
    layer = palette.stitch_layers["1"]
    assert torch.allclose(layer.weight.double(), w[:-1].T, atol=1e-4)
    assert torch.allclose(layer.bias.double(), w[-1], atol=1e-4)
    residual = (x @ w - hl).norm() / hl.norm()
    assert palette.stitch_fit_errors["1"] == pytest.approx(float(residual), rel=1e-3)


@torch.no_grad()
def test_fit_beats_the_identity_start():
    small, large = make_pair("llama")
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 2)], calibration=CALIB)
    unfitted = StitchedLlamaForCausalLM(palette.config, small=palette.small, large=palette.large).eval()
    hs = small(CALIB, output_hidden_states=True).hidden_states[1][:, 1:]
    hl = large(CALIB, output_hidden_states=True).hidden_states[2][:, 1:]

    def error(layer):
        return float((layer(hs) - hl).norm() / hl.norm())

    assert error(palette.stitch_layers["1"]) < 0.9 * error(unfitted.stitch_layers["1"])
    assert error(palette.stitch_layers["1"]) == pytest.approx(palette.stitch_fit_errors["1"], rel=0.05)


@torch.no_grad()
def test_first_token_state_is_the_large_anchors_mean_first_state():
    """From full-length runs of the plain large anchor (the fit uses one-token runs)."""
    small, large = make_pair("qwen2")
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 2), (1, 1)], calibration=CALIB)
    hidden = large(CALIB, output_hidden_states=True).hidden_states
    for j in (1, 2):
        expected = hidden[j][:, 0].mean(dim=0)
        assert torch.allclose(palette.first_token_states[f"1_{j}"].state, expected, atol=1e-5)
    assert not any(name.startswith("first_token_states") for name, _ in palette.named_parameters())


@torch.no_grad()
def test_map_first_token_off_feeds_the_stitching_layer_output():
    small, large = make_pair("llama")
    on = StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 2)], calibration=CALIB)
    off = StitchedLlamaForCausalLM.from_anchors(
        small, large, stitches=[(1, 2)], calibration=CALIB, map_first_token=False
    )
    assert not off.config.map_first_token and len(off.first_token_states) == 0
    assert torch.equal(on.stitch_layers["1"].weight, off.stitch_layers["1"].weight)  # same fit either way
    x = CALIB[:2]
    assert not torch.allclose(on(x, stitch=1).logits, off(x, stitch=1).logits, atol=1e-4)
    assert torch.equal(on(x, stitch=0).logits, off(x, stitch=0).logits)  # anchors never use it


@torch.no_grad()
def test_one_shared_layer_fits_all_of_its_targets_jointly():
    small, large = make_pair("llama")
    shared = StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 1), (1, 2)], calibration=CALIB)
    separate = StitchedLlamaForCausalLM.from_anchors(
        small, large, stitches=[(1, 1), (1, 2)], calibration=CALIB, share_stitch_layers=False
    )
    assert set(shared.stitch_layers) == {"1"}
    assert set(separate.stitch_layers) == {"1_1", "1_2"}
    joint = shared.stitch_layers["1"].weight
    assert not torch.allclose(joint, separate.stitch_layers["1_1"].weight, atol=1e-4)
    assert not torch.allclose(joint, separate.stitch_layers["1_2"].weight, atol=1e-4)


@torch.no_grad()
def test_padding_is_masked_out_of_the_fit():
    """Padding to a common length (batch_size=4) must give the same fit as no padding at all (batch_size=1)."""
    small, large = make_pair("llama")
    ragged = [CALIB[i, : 10 + 3 * i] for i in range(12)]
    lengths_tensor = torch.nn.utils.rnn.pad_sequence(ragged, batch_first=True)
    assert (lengths_tensor == 0).any()

    class Rows:  # the parts of a datasets.Dataset the fit reads
        column_names = ["input_ids"]

        def __getitem__(self, key):
            return [r.tolist() for r in ragged]

    fits = [
        StitchedLlamaForCausalLM.from_anchors(small, large, stitches=[(1, 2)], calibration=Rows(), batch_size=b)
        for b in (1, 4)
    ]
    assert torch.allclose(fits[0].stitch_layers["1"].weight, fits[1].stitch_layers["1"].weight, atol=1e-5)


def test_calibration_from_strings_and_a_dataset(tiny_tokenizer):
    from datasets import Dataset

    texts = [" ".join(f"w{(i * 5 + t) % 90}" for t in range(30)) for i in range(6)]
    from_text = calibration_batches(texts, tiny_tokenizer, vocab_size=VOCAB, min_tokens=33)
    dataset = Dataset.from_dict({"text": texts}).map(lambda r: tiny_tokenizer(r["text"]))
    from_dataset = calibration_batches(dataset, vocab_size=VOCAB, min_tokens=33)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_text, from_dataset))


@pytest.mark.parametrize(
    "calibration, message",
    [
        (torch.randint(3, VOCAB, (2, 10)), "18 usable tokens"),
        (["some text"], "no `tokenizer`"),
        (torch.rand(4, 10), "LongTensor"),
        (torch.full((4, 50), VOCAB + 3), "token id 99"),
        (42, "Unsupported calibration"),
    ],
)
def test_bad_calibration_is_a_clear_error(calibration, message):
    small, large = make_pair("llama")
    with pytest.raises((ValueError, TypeError), match=message):
        StitchedLlamaForCausalLM.from_anchors(small, large, calibration=calibration)


def test_no_calibration_falls_back_with_a_warning(caplog):
    small, large = make_pair("llama")
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        palette = StitchedLlamaForCausalLM.from_anchors(small, large)
    assert "No calibration data given" in caplog.text
    assert set(palette.stitch_fit_errors) == set(palette.stitch_layers)


def test_ridge_solve_equals_least_squares_on_the_augmented_problem():
    from stitched_llama.stitch_init import ridge_solve

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 6, generator=g, dtype=torch.float64), torch.ones(50, 1, dtype=torch.float64)], 1)
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    gram = x.T @ x
    lam = 0.3 * float(gram.diagonal()[:-1].mean())
    # ||XW - Y||^2 + lam ||W[:-1]||^2 is plain least squares on X stacked over sqrt(lam) [I 0] (the bias unpenalised)
    penalty = torch.cat([lam**0.5 * torch.eye(6, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(
        torch.cat([x, penalty]), torch.cat([y, torch.zeros(6, 4, dtype=torch.float64)])
    ).solution
    assert torch.allclose(ridge_solve(gram, x.T @ y, ridge=0.3), expected, atol=1e-10)


@torch.no_grad()
def test_capture_gives_the_anchors_own_hidden_states():
    """Per batch, exactly `output_hidden_states` of the plain anchors: after n small layers (the last one before the
    final norm), entering large layer j; a padded batch with its mask, an unpadded one without."""
    from stitched_llama.stitch_init import capture_anchor_states

    small, large = make_pair("llama")
    mask = torch.ones(4, 40, dtype=torch.long)
    mask[2:, 30:] = 0
    batches = [(CALIB[:4], mask), (CALIB[4:7], None)]
    captured = list(capture_anchor_states(small, large, batches, cuts=[1, 2], entries=[0, 2, 3]))
    assert len(captured) == 2
    for (ids, attention_mask), (small_states, large_states) in zip(batches, captured):
        hs = small(ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        hl = large(ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        assert set(small_states) == {1, 2} and set(large_states) == {0, 2, 3}
        assert torch.equal(small_states[1], hs[1])
        assert torch.equal(small.model.norm(small_states[2]), hs[2])  # hidden_states[-1] is after the final norm
        for j in (0, 2, 3):
            assert torch.equal(large_states[j], hl[j])
    none, only_large = next(capture_anchor_states(None, large, batches, entries=[1]))  # the small anchor not run
    assert none == {}
    assert torch.equal(only_large[1], large(CALIB[:4], attention_mask=mask, output_hidden_states=True).hidden_states[1])

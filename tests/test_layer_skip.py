"""Stitches that skip a block of the large anchor, the block chosen by angular distance, and the search."""

import copy

import pytest
import torch
from conftest import VOCAB, build_palette, make_pair, prompt
from torch import nn
from transformers import LlamaForCausalLM

from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM
from stitched_llama.evaluation import evaluate_palette
from stitched_llama.search import candidate_stitches, layer_skip_blocks, search_palette

# llama pair: a 2-layer small anchor, a 4-layer large one.
SKIPS = [(0, 0, 1, 3), (1, 1, 2, 3), (2, 2, 2, 3)]


def without_layers(anchor, dropped):
    """A copy of `anchor` with the layers in `dropped` removed, as a user pruning it by hand would."""
    pruned = copy.deepcopy(anchor)
    kept = [layer for i, layer in enumerate(pruned.model.layers) if i not in dropped]
    pruned.model.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    pruned.config.num_hidden_layers = len(kept)
    if getattr(pruned.config, "layer_types", None) is not None:
        pruned.config.layer_types = [t for i, t in enumerate(pruned.config.layer_types) if i not in dropped]
    return pruned


@pytest.fixture(scope="module")
def skipping():
    return build_palette("llama", stitches=[(1, 2), *SKIPS])


def test_a_skipped_block_is_the_plain_anchor_without_those_layers(skipping):
    palette, (_, large) = skipping
    k = [tuple(s) for s in palette.config.stitches].index((0, 0, 1, 3))
    assert palette.config.stitch_kind(k) == "layer skip"
    pruned = without_layers(large, {1, 2})
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(palette(ids, stitch=k).logits, pruned(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_hybrid_that_skips_runs_the_layers_it_keeps(skipping):
    palette, _ = skipping
    k = [tuple(s) for s in palette.config.stitches].index((1, 1, 2, 3))
    assert palette.config.stitch_kind(k) == "hybrid + skip" and palette.config.num_layers(k) == 1 + 2
    ran = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, layer in enumerate(palette.large.model.layers)
    ]
    with torch.no_grad():
        palette(prompt(), stitch=k)
    for hook in hooks:
        hook.remove()
    assert ran == [1, 3]


def test_skip_costs_drop_the_skipped_layers(skipping):
    palette, _ = skipping
    config = palette.config
    stitches = [tuple(s) for s in config.stitches]
    full, skip = config.stitch_cost(-1), config.stitch_cost(stitches.index((0, 0, 1, 3)))
    layer = palette.large.model.layers[0]
    layer_params = sum(p.numel() for p in layer.parameters())
    layer_macs = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    assert full.params - skip.params == 2 * layer_params
    assert full.flops_per_token - skip.flops_per_token == 2 * 2 * layer_macs
    flops = [config.stitch_cost(k).flops_per_token for k in range(1, len(stitches) - 1)]
    assert flops == sorted(flops)  # hybrids, skips among them, stay sorted by cost


@pytest.mark.parametrize("spec", SKIPS)
def test_cached_generation_equals_uncached_for_skip_stitches(skipping, spec):
    palette, _ = skipping
    k = [tuple(s) for s in palette.config.stitches].index(spec)
    ids = prompt(1, 5)
    kwargs = dict(max_new_tokens=6, do_sample=False, stitch=k, pad_token_id=0)
    cached = palette.generate(ids, use_cache=True, **kwargs)
    uncached = palette.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_skip_stitches_round_trip_and_export(skipping, tmp_path):
    palette, (_, large) = skipping
    palette.save_pretrained(tmp_path / "palette")
    loaded = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "palette").eval()
    assert loaded.config.stitches == palette.config.stitches
    ids = prompt()
    k = [tuple(s) for s in palette.config.stitches].index((0, 0, 1, 3))
    h = [tuple(s) for s in palette.config.stitches].index((1, 1, 2, 3))
    with torch.no_grad():
        for stitch in (k, h):
            torch.testing.assert_close(loaded(ids, stitch=stitch).logits, palette(ids, stitch=stitch).logits)
    # The large anchor with a block skipped exports as a plain, shorter model of the same architecture.
    assert palette.export_stitch(k, tmp_path / "skip") == "LlamaForCausalLM"
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "skip").eval()
    assert exported.config.num_hidden_layers == 2
    assert palette.export_stitch(h, tmp_path / "hybrid-skip") == "StitchedLlamaForCausalLM"
    slim = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "hybrid-skip").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, palette(ids, stitch=k).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(slim(ids).logits, palette(ids, stitch=h).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, word",
    [
        ((0, 0, 3, 1), "skips large-anchor layers"),  # a >= b
        ((1, 2, 1, 3), "skips large-anchor layers"),  # starts before j
        ((0, 0, 0, 4), "skips large-anchor layers"),  # nothing left to run
        ((2, 4, 1, 2), "skips large-anchor layers"),  # the small anchor stitch
        ((1, 2, 3), "is not an"),
        ((1, 2, 2.0, 3), "is not an"),
    ],
)
def test_bad_skips_are_refused(spec, word):
    small, large = make_pair("llama")
    with pytest.raises(ValueError, match=word):
        StitchedLlamaConfig(small_config=small.config, large_config=large.config, stitches=[spec])


def test_layer_skip_blocks_find_the_layer_that_does_nothing():
    _, large = make_pair("llama")
    with torch.no_grad():  # layer 1 becomes the identity: its residual branches add nothing
        large.model.layers[1].self_attn.o_proj.weight.zero_()
        large.model.layers[1].mlp.down_proj.weight.zero_()
    calibration = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    assert layer_skip_blocks(large, calibration, block_sizes=(1,)) == [(1, 2)]
    ((a, b),) = layer_skip_blocks(large, calibration, block_sizes=(2,))
    assert b - a == 2 and a <= 1 < b and b <= 3  # the last layer is kept
    with pytest.raises(ValueError, match="Block size 4"):
        layer_skip_blocks(large, calibration, block_sizes=(4,))


def test_search_keeps_the_best_stitch_per_budget():
    small, large = make_pair("llama")
    config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
    candidates = candidate_stitches(config, blocks=[(2, 3)])
    assert (0, 0, 2, 3) in candidates and (1, 1) in candidates and (1, 1, 2, 3) in candidates
    assert (1, 2, 2, 3) not in candidates  # a block right at j is only (1, 3), fitted to the wrong layer
    calibration = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    heldout = [{"input_ids": row} for row in torch.randint(3, VOCAB, (6, 24), generator=torch.Generator()).tolist()]
    palette, rows = search_palette(
        small, large, candidates, calibration, heldout, num_budgets=2, evaluate_kwargs={"progress": False}
    )
    kept = [r for r in rows if r["kept"]]
    assert len(rows) == len(candidates) + 2 and kept[0]["kind"] == "small anchor" and kept[-1]["kind"] == "large anchor"
    # Every kept hybrid has the lowest loss of its FLOPs interval, by the table's own numbers.
    lo, hi = rows[0]["flops_per_token"], rows[-1]["flops_per_token"]
    width = (hi - lo) / 2
    for row in kept[1:-1]:
        part = min(int((row["flops_per_token"] - lo) / width), 1)
        rivals = [r for r in rows if min(int((r["flops_per_token"] - lo) / width), 1) == part]
        assert row["loss"] == min(r["loss"] for r in rivals)
    # The rebuilt palette holds exactly the kept stitches, with the losses the search measured.
    again = evaluate_palette(palette, heldout, progress=False)
    assert [r["name"] for r in again] == [r["name"] for r in kept]
    for new, old in zip(again, kept):
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-5)


def test_candidates_thin_out_snnet_stitches_with_every():
    small, large = make_pair("llama")
    config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
    every_one = candidate_stitches(config, spread=0)
    every_two = candidate_stitches(config, spread=0, every=2)
    assert every_two == every_one[::2] and len(every_two) < len(every_one)
    for bad in (dict(every=0), dict(spread=-1)):
        with pytest.raises(ValueError, match="must be at least"):
            candidate_stitches(config, **bad)

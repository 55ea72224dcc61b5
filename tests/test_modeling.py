import copy

import pytest
import torch
from conftest import VOCAB, build_palette, make_pair, prompt
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.modeling_stitched_llama import CACHE_KEY

ATOL = 1e-5


@torch.no_grad()
def test_anchor_stitches_reproduce_the_plain_anchors(pair_name):
    palette, (small, large) = build_palette(pair_name)
    x = prompt()
    assert torch.allclose(palette(x, stitch=0).logits, small(x).logits, atol=ATOL)
    assert torch.allclose(palette(x, stitch=-1).logits, large(x).logits, atol=ATOL)


def test_building_a_palette_leaves_the_anchor_weights_untouched():
    palette, (small, large) = build_palette("qwen2")
    for anchor, reference in ((palette.small, small), (palette.large, large)):
        for (name, p), (_, q) in zip(anchor.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(p, q), name


def test_tied_embeddings_stay_tied():
    palette, _ = build_palette("llama")
    assert palette.small.lm_head.weight is palette.small.model.embed_tokens.weight
    assert palette.large.lm_head.weight is not palette.large.model.embed_tokens.weight


@torch.no_grad()
def test_hybrid_stitch_runs_the_modules_it_names():
    """Recompute stitch (n, j) by hand from the plain anchors' modules."""
    palette, (small, large) = build_palette("llama")
    k = next(i for i, s in enumerate(palette.config.stitches) if s == [1, 2])
    x = prompt(batch=1)
    pos = torch.arange(x.shape[1])[None]
    h = small.model.embed_tokens(x)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    rope = small.model.rotary_emb(h, pos)
    h = small.model.layers[0](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    h = palette.stitch_layers["1"](h)
    h[:, 0] = palette.first_token_states["1_2"].state  # the large anchor's own first-token state
    rope = large.model.rotary_emb(h, pos)
    for layer in large.model.layers[2:]:
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    expected = large.lm_head(large.model.norm(h))
    assert torch.allclose(palette(x, stitch=k).logits, expected, atol=ATOL)


@torch.no_grad()
def test_cached_generation_equals_uncached_for_every_stitch(pair_name):
    palette, _ = build_palette(pair_name)
    x = prompt()
    for k in range(palette.num_stitches):
        cached = palette.generate(x, max_new_tokens=8, do_sample=False, stitch=k, pad_token_id=0)
        uncached = palette.generate(x, max_new_tokens=8, do_sample=False, stitch=k, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached), f"stitch {k}"


@torch.no_grad()
def test_a_cache_cannot_be_continued_by_another_stitch():
    palette, _ = build_palette("llama")
    x = prompt(batch=1)
    cache = palette(x, stitch=1)[CACHE_KEY]
    assert palette(x[:, -1:], cache=cache, stitch=1).logits.shape[1] == 1  # the same stitch goes on
    with pytest.raises(ValueError, match="holds 10 tokens from stitch 1, so stitch 0 cannot continue it"):
        palette(x[:, -1:], cache=cache, stitch=0)


@torch.no_grad()
def test_the_cache_is_accepted_under_both_names_but_not_twice(recwarn):
    palette, _ = build_palette("llama")
    x = prompt(batch=1)
    full = palette(x, stitch=1, use_cache=False).logits[:, -1]
    for name in ("cache", "past_key_values"):
        cache = palette(x[:, :-1], stitch=1)[CACHE_KEY]
        step = palette(x[:, -1:], stitch=1, **{name: cache}).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    with pytest.raises(ValueError, match="not both"):
        palette(x, cache=DynamicCache(), past_key_values=DynamicCache())


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows():
    palette, _ = build_palette("qwen2")
    long, short = prompt(1, 9, seed=1), prompt(1, 5, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for k in range(palette.num_stitches):
        batch = palette.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, stitch=k, pad_token_id=0)
        alone = palette.generate(short, max_new_tokens=6, do_sample=False, stitch=k, pad_token_id=0)
        assert torch.equal(batch[1, -6:], alone[0, -6:]), f"stitch {k}"
        first = palette(ids, attention_mask=mask, stitch=k).logits[1, -1]
        assert torch.allclose(first, palette(short, stitch=k).logits[0, -1], atol=1e-4)


@torch.no_grad()
def test_eager_and_sdpa_attention_agree():
    eager, (small, large) = build_palette("llama", anchor_kwargs={"attn": "eager"})
    sdpa, _ = build_palette("llama", anchor_kwargs={"attn": "sdpa"})
    assert eager.small.config._attn_implementation == "eager"
    assert sdpa.large.config._attn_implementation == "sdpa"
    x = prompt()
    for k in range(eager.num_stitches):
        assert torch.allclose(eager(x, stitch=k).logits, sdpa(x, stitch=k).logits, atol=ATOL)


@torch.no_grad()
def test_switching_stitch_between_generate_calls_matches_a_fresh_model():
    palette, _ = build_palette("mistral")
    fresh = copy.deepcopy(palette)
    x = prompt()
    palette.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)  # large anchor first
    palette.set_stitch(1)
    switched = palette.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert palette.active_stitch == 1
    fresh.set_stitch(1)
    assert torch.equal(switched, fresh.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0))


@torch.no_grad()
def test_stitch_argument_does_not_change_the_active_stitch():
    palette, _ = build_palette("llama")
    palette.set_stitch(2)
    x = prompt()
    palette.generate(x, max_new_tokens=3, do_sample=False, stitch=0, pad_token_id=0)
    palette(x, stitch=1)
    assert palette.active_stitch == 2
    assert torch.equal(palette(x).logits, palette(x, stitch=2).logits)


def test_stitches_give_different_outputs():
    palette, _ = build_palette("llama")
    x = prompt()
    logits = [palette(x, stitch=k).logits for k in range(palette.num_stitches)]
    for a in range(len(logits)):
        for b in range(a + 1, len(logits)):
            assert not torch.allclose(logits[a], logits[b], atol=1e-3)


def test_loss_and_gradients_flow_through_a_hybrid():
    palette, _ = build_palette("qwen2")
    x = prompt()
    out = palette(x, labels=x, stitch=1)
    out.loss.backward()
    assert palette.stitch_layers[palette.config.stitch_layer_key(1)].weight.grad.abs().sum() > 0
    assert palette.small.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("bad", [99, -99, 1.5, "2"])
def test_unknown_stitch_is_a_clear_error(bad):
    palette, _ = build_palette("llama")
    with pytest.raises(ValueError, match="Unknown stitch"):
        palette.set_stitch(bad)
    with pytest.raises(ValueError, match="Unknown stitch"):
        palette(prompt(), stitch=bad)


def test_stitch_table_lists_every_stitch():
    palette, _ = build_palette("llama")
    table = palette.stitch_table()
    assert [r["stitch"] for r in table] == list(range(palette.num_stitches))
    assert table[0]["kind"] == "small anchor" and table[-1]["kind"] == "large anchor"
    assert table[0]["params"] == sum(p.numel() for p in palette.small.parameters())
    assert "| 0 | (2, 4) | small anchor | 2 |" in palette.format_stitch_table()


def test_mismatched_vocabularies_are_rejected():
    small, _ = make_pair("llama")
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(ValueError, match="must share a tokenizer"):
        StitchedLlamaForCausalLM.from_anchors(small, other, calibration=prompt(8, 32))


@torch.no_grad()
def test_anchors_still_work_alone_after_a_hybrid_ran():
    palette, (small, large) = build_palette("llama")
    x = prompt()
    palette.generate(x, max_new_tokens=4, do_sample=False, stitch=2, pad_token_id=0)
    alone = palette.large.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(alone, large.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert [layer.self_attn.layer_idx for layer in palette.large.model.layers] == list(range(4))


@torch.no_grad()
def test_hidden_states_match_the_plain_anchors_and_count_the_layers_run():
    palette, (small, large) = build_palette("llama")
    x = prompt()
    for stitch, plain in ((0, small), (-1, large)):
        ours = palette(x, stitch=stitch, output_hidden_states=True).hidden_states
        theirs = plain(x, output_hidden_states=True).hidden_states
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k in range(1, palette.num_stitches - 1):
        n, j = palette.config.stitches[k]
        states = palette(x, stitch=k, output_hidden_states=True).hidden_states
        assert len(states) == palette.config.num_layers(k) + 1, k
        widths = [h.shape[-1] for h in states]
        assert widths == [small.config.hidden_size] * n + [large.config.hidden_size] * (len(states) - n), k
    assert palette(x, stitch=1).hidden_states is None


@torch.no_grad()
def test_return_dict_false_returns_a_tuple():
    palette, _ = build_palette("llama")
    x = prompt()
    out = palette(x, labels=x, stitch=1, return_dict=False)
    assert isinstance(out, tuple)
    reference = palette(x, labels=x, stitch=1)
    torch.testing.assert_close(out[0], reference.loss)
    torch.testing.assert_close(out[1], reference.logits)


@torch.no_grad()
def test_attentions_match_the_plain_anchors_and_count_the_layers_run():
    palette, (small, large) = build_palette("llama", anchor_kwargs={"attn": "eager"})
    x = prompt()
    for stitch, plain in ((0, small), (-1, large)):
        ours = palette(x, stitch=stitch, output_attentions=True).attentions
        theirs = plain(x, output_attentions=True).attentions
        assert len(ours) == len(theirs) == plain.config.num_hidden_layers
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k in range(1, palette.num_stitches - 1):
        n, _ = palette.config.stitches[k]
        attentions = palette(x, stitch=k, output_attentions=True).attentions
        heads = [a.shape[1] for a in attentions]
        assert heads == [small.config.num_attention_heads] * n + [large.config.num_attention_heads] * (
            palette.config.num_layers(k) - n
        ), k
    assert palette(x, stitch=1).attentions is None
    sdpa, _ = build_palette("llama")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        sdpa(x, stitch=1, output_attentions=True)

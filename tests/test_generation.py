"""generate() on a palette behaves like generate() on a plain causal LM: the same options give the same tokens."""

import os
import shutil

import pytest
import torch
from conftest import build_palette, prompt

GENERATE_OPTIONS = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampled returns": dict(do_sample=True, num_return_sequences=3),
    "prompt lookup": dict(do_sample=False, prompt_lookup_num_tokens=3),
}


def generate(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)  # sampling draws from the global generator
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, **kwargs)


@pytest.fixture(scope="module")
def palette_and_anchors():
    return build_palette("llama")


def test_generation_config_comes_from_the_anchors(palette_and_anchors):
    palette, (small, _) = palette_and_anchors
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(palette.generation_config, key) == getattr(small.generation_config, key) is not None, key


@torch.no_grad()
def test_generation_stops_at_eos(palette_and_anchors):
    palette, _ = palette_and_anchors
    x = prompt(batch=1)
    free = generate(palette, x, do_sample=False, stitch=1, eos_token_id=[])  # never stops early
    eos = int(free[0, x.shape[1] + 2])  # make the third new token the end of the sequence
    stopped = generate(palette, x, do_sample=False, stitch=1, eos_token_id=eos)
    first = (free[0, x.shape[1] :] == eos).nonzero()[0].item()
    assert stopped.shape[1] == x.shape[1] + first + 1
    assert torch.equal(stopped[0], free[0, : stopped.shape[1]])


@pytest.mark.parametrize("option", sorted(GENERATE_OPTIONS))
@torch.no_grad()
def test_cached_generation_equals_uncached_and_the_plain_anchors(palette_and_anchors, option):
    palette, (small, large) = palette_and_anchors
    kwargs = GENERATE_OPTIONS[option]
    x = prompt(batch=1 if "prompt_lookup_num_tokens" in kwargs else 2)  # assisted decoding takes one row
    for k in range(palette.num_stitches):
        cached = generate(palette, x, stitch=k, **kwargs)
        # Assisted decoding needs a cache; without one, its plain counterpart must give the same tokens.
        plain_kwargs = {key: value for key, value in kwargs.items() if key != "prompt_lookup_num_tokens"}
        uncached = generate(palette, x, stitch=k, use_cache=False, **plain_kwargs)
        assert torch.equal(cached, uncached), f"stitch {k}"
    assert torch.equal(generate(palette, x, stitch=0, **kwargs), generate(small, x, **kwargs))
    assert torch.equal(generate(palette, x, stitch=-1, **kwargs), generate(large, x, **kwargs))


@torch.no_grad()
def test_scores_and_logits_match_the_plain_anchor(palette_and_anchors):
    palette, (small, _) = palette_and_anchors
    x = prompt()
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, plain = generate(palette, x, stitch=0, **kwargs), generate(small, x, **kwargs)
    assert torch.equal(ours.sequences, plain.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == len(getattr(plain, name)) == 6
        for a, b in zip(getattr(ours, name), getattr(plain, name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_cache_matches_dynamic_cache(palette_and_anchors):
    palette, _ = palette_and_anchors
    x = prompt()
    for k in range(palette.num_stitches):
        static = generate(palette, x, do_sample=False, stitch=k, cache_implementation="static")
        assert torch.equal(static, generate(palette, x, do_sample=False, stitch=k)), f"stitch {k}"


@pytest.mark.parametrize(
    "backend",
    [
        "eager",  # traces the same graph as inductor, without a C compiler, in seconds
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.compile,
                pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler"),
            ],
        ),
    ],
)
@torch.no_grad()
def test_static_cache_decodes_under_torch_compile_in_one_graph(backend):
    # The GPU recipe: a static cache and a compiled forward. fullgraph=True fails on any graph break (a branch on
    # the cache's length, which is a tensor there); inductor also generates and runs the kernels (a minute a stitch
    # on 2 CPU cores, so it runs in CI's `-m compile` step, not by default).
    palette, _ = build_palette("llama", map_first_token=True)
    x = prompt(batch=1)
    hybrid = next(k for k in range(palette.num_stitches) if palette.config.stitch_kind(k) == "hybrid")
    stitches = (0, hybrid, palette.num_stitches - 1)
    expected = {k: generate(palette, x, do_sample=False, stitch=k, use_cache=False) for k in stitches}
    forward = palette.forward
    try:
        for k in stitches:
            torch._dynamo.reset()  # one compiled forward per served stitch, as a deployment would have
            palette.forward = torch.compile(forward, fullgraph=True, backend=backend)
            static = generate(palette, x, do_sample=False, stitch=k, cache_implementation="static")
            assert torch.equal(static, expected[k]), f"stitch {k}"
    finally:
        palette.forward = forward
        torch._dynamo.reset()


@torch.no_grad()
def test_self_speculative_decoding_matches_greedy(palette_and_anchors):
    palette, _ = palette_and_anchors
    x = prompt(batch=1)
    for k in range(1, palette.num_stitches):
        drafted = generate(palette, x, do_sample=False, stitch=k, assistant_model=palette.stitch_view(0))
        assert torch.equal(drafted, generate(palette, x, do_sample=False, stitch=k)), f"stitch {k}"


@torch.no_grad()
def test_streamer_sees_the_generated_tokens(palette_and_anchors, tiny_tokenizer):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text = getattr(self, "text", "") + text

    palette, _ = palette_and_anchors
    x = prompt(batch=1)
    streamer = Collect(tiny_tokenizer, skip_prompt=True)
    out = generate(palette, x, do_sample=False, stitch=1, streamer=streamer)
    assert streamer.text.split() == tiny_tokenizer.decode(out[0, x.shape[1] :]).split()

import pytest
from conftest import VOCAB, make_anchor
from transformers import GPT2Config, LlamaConfig

from stitched_llama import StitchedLlamaConfig, default_stitches


def tiny(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    return LlamaConfig(**{**base, **kw})


def test_default_stitch_space_follows_relative_depth():
    assert default_stitches(2, 4) == [(2, 4), (2, 3), (1, 2), (1, 1), (0, 0)]
    stitches = default_stitches(6, 12)
    hybrids = stitches[1:-1]
    assert len(hybrids) == 11
    assert all(n == max(1, round(j * 6 / 12)) for n, j in hybrids)


def test_stitches_sorted_by_cost_with_anchors_at_the_ends():
    config = StitchedLlamaConfig(small_config=tiny(), large_config=tiny(hidden_size=64, num_hidden_layers=6))
    assert config.stitches[0] == [2, 6]
    assert config.stitches[-1] == [0, 0]
    flops = [config.stitch_cost(k).flops_per_token for k in range(len(config.stitches))]
    assert flops[1:-1] == sorted(flops[1:-1])
    assert config.default_stitch == len(config.stitches) - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="llama", tie=True),
        dict(arch="llama", attention_bias=True, mlp_bias=True),
        dict(arch="qwen2", tie=True),
        dict(arch="mistral", head_dim=16, kv_heads=1),
    ],
)
def test_anchor_cost_matches_real_parameter_count(kwargs):
    model = make_anchor(**kwargs)
    other = make_anchor(hidden=48, layers=3, heads=4, kv_heads=2, arch=kwargs["arch"])
    config = StitchedLlamaConfig(small_config=model.config, large_config=other.config)
    assert config.stitch_cost(0).params == sum(p.numel() for p in model.parameters())
    assert config.stitch_cost(-1).params == sum(p.numel() for p in other.parameters())


def test_hybrid_cost_counts_the_modules_it_runs():
    small, large = make_anchor(tie=True), make_anchor(hidden=48, layers=4, heads=4, kv_heads=1, head_dim=16)
    config = StitchedLlamaConfig(small_config=small.config, large_config=large.config, stitches=[(1, 2)])
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expected = (
        numel(small.model.embed_tokens)
        + numel(small.model.layers[0])
        + 32 * 48
        + 48
        + sum(numel(layer) for layer in large.model.layers[2:])
        + numel(large.model.norm)
        + numel(large.lm_head)
    )
    assert config.stitches == [[2, 4], [1, 2], [0, 0]]
    assert config.stitch_cost(1).params == expected
    macs = sum(m.weight.numel() for m in small.model.layers[0].modules() if m.__class__.__name__ == "Linear")
    macs += 32 * 48 + large.lm_head.weight.numel()
    macs += sum(
        m.weight.numel() for layer in large.model.layers[2:] for m in layer.modules() if hasattr(m, "in_features")
    )
    assert config.stitch_cost(1).flops_per_token == 2 * macs


def test_round_trip_through_dict():
    config = StitchedLlamaConfig(
        small_config=tiny(), large_config=tiny(hidden_size=48, num_hidden_layers=4), stitches=[(1, 2), (2, 4)]
    )
    again = StitchedLlamaConfig.from_dict(config.to_dict())
    assert again.stitches == config.stitches == [[2, 4], [1, 2], [0, 0]]
    assert again.large_config.hidden_size == 48


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(large_config=tiny(vocab_size=VOCAB + 1)), "anchors must share a tokenizer"),
        (dict(large_config=GPT2Config()), "llama, mistral, qwen2"),
        (dict(stitches=[(3, 1)]), "out of range"),
        (dict(stitches=[(0, 1)]), "out of range"),
        (dict(stitches=[(1, 2)]), "out of range"),
        (dict(stitches=[(1, 1), (1, 1)]), "appears twice"),
        (dict(stitches=[]), "empty"),
        (dict(default_stitch=7), "Unknown stitch 7"),
    ],
)
def test_bad_config_is_rejected_with_the_fix(kwargs, message):
    base = dict(small_config=tiny(), large_config=tiny(num_hidden_layers=2))
    with pytest.raises(ValueError, match=message):
        StitchedLlamaConfig(**{**base, **kwargs})


@pytest.mark.parametrize("bad", [(1.5, 2), ("a", "b"), (1, 2, 3), [1], "1,2", (True, 2)])
def test_malformed_stitches_are_refused_not_truncated(bad):
    with pytest.raises(ValueError, match=r"is not an `\(n, j\)` pair of integers"):
        StitchedLlamaConfig(small_config=tiny(), large_config=tiny(num_hidden_layers=4), stitches=[bad])


def test_the_config_and_from_anchors_agree_on_first_token_mapping():
    import inspect

    from stitched_llama import StitchedLlamaForCausalLM

    built = StitchedLlamaConfig(small_config=tiny(), large_config=tiny(hidden_size=64))
    default = inspect.signature(StitchedLlamaForCausalLM.from_anchors).parameters["map_first_token"].default
    assert built.map_first_token is default is True

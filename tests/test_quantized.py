"""QLoRA path: anchors loaded in 4-bit with bitsandbytes (it runs on CPU, so this checks correctness, not speed)."""

import pytest
import torch
from conftest import VOCAB, make_anchor
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.esta import merge_esta, prepare_esta

bnb = pytest.importorskip("bitsandbytes", reason="the `quant` extra (bitsandbytes) is not installed")

X = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))


def quantization():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")


@pytest.fixture(scope="module")
def anchor_dirs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anchors")
    # bitsandbytes' packed 4-bit CPU path needs out-features divisible by 32 and in-features by its block of 64,
    # and its in-place bias add fails under autograd, so these anchors are bias-free llamas.
    small = make_anchor("llama", hidden=64, layers=2, heads=4, kv_heads=2, tie=True, seed=2)
    large = make_anchor("llama", hidden=64, layers=4, heads=4, kv_heads=1, head_dim=32, seed=3)
    small.save_pretrained(folder / "small")
    large.save_pretrained(folder / "large")
    return folder / "small", folder / "large"


@torch.no_grad()
def test_4bit_anchor_stitches_match_the_4bit_anchors(anchor_dirs):
    small_dir, large_dir = anchor_dirs
    palette = StitchedLlamaForCausalLM.from_anchors(
        small_dir, large_dir, calibration=CALIB, quantization_config=quantization()
    )
    assert isinstance(palette.small.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    plain_small = AutoModelForCausalLM.from_pretrained(small_dir, quantization_config=quantization())
    plain_large = AutoModelForCausalLM.from_pretrained(large_dir, quantization_config=quantization())
    assert torch.allclose(palette(X, stitch=0).logits, plain_small(X).logits, atol=1e-5)
    assert torch.allclose(palette(X, stitch=-1).logits, plain_large(X).logits, atol=1e-5)
    for k in range(palette.num_stitches):
        cached = palette.generate(X, max_new_tokens=5, do_sample=False, stitch=k, pad_token_id=0)
        uncached = palette.generate(X, max_new_tokens=5, do_sample=False, stitch=k, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, uncached), k


def test_qlora_training_step_moves_only_the_adapter(anchor_dirs):
    small_dir, large_dir = anchor_dirs
    palette = StitchedLlamaForCausalLM.from_anchors(
        small_dir, large_dir, calibration=CALIB, quantization_config=quantization()
    )
    model = prepare_esta(palette)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = model(input_ids=X, labels=X, stitch=step % palette.num_stitches).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


@torch.no_grad()
def test_a_palette_with_stitch_biases_loads_in_4bit_with_its_biases(anchor_dirs, tmp_path):
    # bitsandbytes replaces the linears, and with them their `stitch_bias` children: the load must put them back.
    small_dir, large_dir = anchor_dirs
    palette = merge_esta(prepare_esta(StitchedLlamaForCausalLM.from_anchors(small_dir, large_dir, calibration=CALIB)))
    generator = torch.Generator().manual_seed(4)
    for k in range(palette.num_stitches):
        for bias in palette.stitch_bias_parameters(k).values():
            bias.copy_(torch.randn(bias.shape, generator=generator))
    palette.save_pretrained(tmp_path / "palette")
    quantized = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "palette", quantization_config=quantization())
    assert isinstance(quantized.large.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    for k in range(palette.num_stitches):
        saved, loaded = palette.stitch_bias_parameters(k), quantized.stitch_bias_parameters(k)
        assert saved.keys() == loaded.keys() and saved, k
        assert all(torch.equal(saved[name], loaded[name]) for name in saved), k
        # The biases act: the 4-bit output is near the full-precision palette's, and far from it without biases.
        biased = palette(X, stitch=k).logits
        with palette.disable_stitch_biases():
            unbiased = palette(X, stitch=k).logits
        error = (quantized(X, stitch=k).logits - biased).abs().max()
        assert error < (biased - unbiased).abs().max() / 4, k

"""Tiny seeded anchors built in-process: every test runs offline in seconds."""

from __future__ import annotations

import copy
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

VOCAB = 96
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def make_anchor(
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    tie: bool = False,
    seed: int = 0,
    attn: str = "sdpa",
    **extra,
):
    config = CONFIGS[arch](
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# Pairs chosen to cover the cases: tied embeddings, different head_dim and GQA, qwen2 biases.
PAIRS = {
    "llama": (
        dict(arch="llama", hidden=32, layers=2, heads=4, kv_heads=2, tie=True, seed=0),
        dict(arch="llama", hidden=48, layers=4, heads=4, kv_heads=1, head_dim=16, seed=1),
    ),
    "qwen2": (
        dict(arch="qwen2", hidden=32, layers=3, heads=4, kv_heads=2, tie=True, seed=2),
        dict(arch="qwen2", hidden=64, layers=4, heads=8, kv_heads=2, seed=3),
    ),
    "mistral": (
        dict(arch="mistral", hidden=32, layers=2, heads=4, kv_heads=4, seed=4),
        dict(arch="mistral", hidden=48, layers=3, heads=6, kv_heads=2, seed=5),
    ),
}


def make_pair(name: str = "llama", **overrides):
    small_kw, large_kw = PAIRS[name]
    return make_anchor(**{**small_kw, **overrides}), make_anchor(**{**large_kw, **overrides})


def build_palette(name: str = "llama", seed: int = 0, **kwargs):
    """A palette plus untouched deep copies of its anchors, to compare against."""
    from stitched_llama import StitchedLlamaForCausalLM

    small, large = make_pair(name, **kwargs.pop("anchor_kwargs", {}))
    reference = (copy.deepcopy(small), copy.deepcopy(large))
    calibration = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(seed))
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, calibration=calibration, **kwargs)
    return palette.eval(), reference


def prompt(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    """Seeded token ids, clear of the pad/bos/eos ids."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def record_stitches(palette) -> list:
    """The `stitch` of every forward the palette runs. Wraps the bound `forward`, because peft 0.18 calls
    `model.forward(...)` directly, past any module hook."""
    seen, forward = [], palette.forward

    @functools.wraps(forward)  # peft reads the signature to route its arguments
    def recording_forward(*args, **kwargs):
        seen.append(kwargs.get("stitch"))
        return forward(*args, **kwargs)

    palette.forward = recording_forward
    return seen


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(params=sorted(PAIRS))
def pair_name(request):
    return request.param

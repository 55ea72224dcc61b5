"""Built-in defaults for demos and examples: a word-level tokenizer and two tiny LLaMA anchors, made offline.

They let the whole build -> train -> evaluate -> chat path run in minutes on a CPU with nothing downloaded.
The anchors start from random weights, so what they say means something only after fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Alpaca-free chat template: the data module then renders records with it and trains on the replies only.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words and punctuation of `texts` (plus the chat role markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = SPECIAL_TOKENS + ["<system>", "<user>", "<assistant>"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<system>", "<user>", "<assistant>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_anchors(vocab_size: int, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A 4-layer (hidden 64) small anchor and an 8-layer (hidden 128) large anchor, seeded."""

    def anchor(hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlamaForCausalLM(config).eval()

    return anchor(64, 4, 4, seed), anchor(128, 8, 8, seed + 1)

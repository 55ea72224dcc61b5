"""The benchmark's data: calibration and held-out windows of text, WordNet records, transcript prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from .settings import Run, Setting, Sources

TRANSCRIPT_PROMPTS = (
    'Define the word "harbor".',
    None,  # the first WordNet test prompt, filled in at run time
    "Write a Python function that checks whether a string is a palindrome.",
)


def text_chunks(path: Path, tokenizer: Any, num: int, length: int) -> torch.LongTensor:
    """`[num, length]`: non-overlapping windows of tokens, spread evenly over the whole file."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < num * length:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than {num} x {length}: lower the setting.")
    stride = len(ids) // num
    return torch.tensor([ids[i * stride : i * stride + length] for i in range(num)], dtype=torch.long)


def calibration_chunks(run: Run, tokenizer: Any) -> torch.LongTensor:
    """`[calib_tokens // calib_len, calib_len]`: the least-squares fit's calibration windows."""
    setting = run.setting
    return text_chunks(run.sources.calib, tokenizer, setting.calib_tokens // setting.calib_len, setting.calib_len)


def heldout_chunks(sources: Sources, tokenizer: Any, setting: Setting) -> dict[str, torch.LongTensor]:
    """Per held-out text, `[heldout_seqs, heldout_len]` windows."""
    return {
        name: text_chunks(path, tokenizer, setting.heldout_seqs, setting.heldout_len)
        for name, path in sources.heldout.items()
    }


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wordnet_subset(sources: Sources, split: str, count: int, seed: int) -> list[dict]:
    records = read_jsonl(sources.wordnet / f"{split}.jsonl")
    random.Random(seed).shuffle(records)
    return records[:count]


def tokenized_examples(records: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Records tokenized with response-only labels; records longer than `max_length` are skipped, not cut."""
    from stitched_llama.data import tokenize_example

    examples = [tokenize_example(r, tokenizer) for r in records]
    return [e for e in examples if len(e["input_ids"]) <= max_length]


def load_data(sources: Sources, tokenizer: Any, setting: Setting) -> dict:
    """Held-out windows, WordNet test examples (for the loss) and records (for generation), transcript prompts."""
    from stitched_llama.data import tokenize_example

    test = wordnet_subset(sources, "test", 4 * setting.eval_examples, setting.seed)
    pairs = [(r, tokenize_example(r, tokenizer)) for r in test]
    pairs = [(r, e) for r, e in pairs if len(e["input_ids"]) <= setting.train_max_length][: setting.eval_examples]
    first_test = read_jsonl(sources.wordnet / "test.jsonl")[0]
    return {
        "heldout": heldout_chunks(sources, tokenizer, setting),
        "eval_examples": [e for _, e in pairs],
        "gen_records": [r for r, _ in pairs][: setting.gen_examples],
        "transcript_prompts": [p if p is not None else first_test["instruction"] for p in TRANSCRIPT_PROMPTS],
        "transcript_references": {first_test["instruction"]: first_test["output"]},
    }

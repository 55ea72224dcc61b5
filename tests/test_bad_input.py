"""Bad input, one row per case: the call, the exception it must raise and a word its message must contain."""

import logging

import pytest
import torch
from conftest import VOCAB, make_pair
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM
from stitched_llama.data import load_instruction_dataset
from stitched_llama.trainer import StitchTrainingArguments

CALIBRATION = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))


def build(calibration=CALIBRATION, **kwargs):
    small, large = make_pair("llama")
    return StitchedLlamaForCausalLM.from_anchors(small, large, calibration=calibration, **kwargs)


def mixed_dtypes():
    small, large = make_pair("llama")
    return StitchedLlamaForCausalLM.from_anchors(small, large.to(torch.bfloat16), calibration=CALIBRATION)


def stitches(value):
    small, large = make_pair("llama")
    return StitchedLlamaConfig(small_config=small.config, large_config=large.config, stitches=value)


def jsonl(tmp_path, content: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    return lambda: load_instruction_dataset(path)


def arguments(tmp_path, **kwargs):
    return lambda: StitchTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


RECORD = b'{"instruction": "a", "output": "b"}\n'
CASES = {  # id -> (factory of the call given tmp_path, exception, word in the message)
    "anchors in different dtypes": (lambda t: mixed_dtypes, ValueError, "different dtypes"),
    "stitch of strings": (lambda t: lambda: stitches([("a", "b")]), ValueError, "is not an"),
    "stitch of three": (lambda t: lambda: stitches([(1, 2, 3)]), ValueError, "is not an"),
    "stitch of one": (lambda t: lambda: stitches([[1]]), ValueError, "is not an"),
    "stitch as a string": (lambda t: lambda: stitches(["1,2"]), ValueError, "is not an"),
    "stitch of floats": (lambda t: lambda: stitches([(1.5, 2)]), ValueError, "is not an"),
    "empty calibration list": (lambda t: lambda: build([]), ValueError, "empty list"),
    "all-padding calibration": (
        lambda t: (
            lambda: build(Dataset.from_dict({"input_ids": CALIBRATION.tolist(), "attention_mask": [[0] * 32] * 16}))
        ),
        ValueError,
        "usable tokens",
    ),
    "negative input_ids in forward": (lambda t: lambda: build()(-CALIBRATION[:1]), ValueError, "token id -"),
    "input_ids past the vocabulary": (lambda t: lambda: build()(CALIBRATION[:1] + VOCAB), ValueError, "vocabulary"),
    "negative token ids": (lambda t: lambda: build(-CALIBRATION), ValueError, "negative token id"),
    "float token ids": (
        lambda t: lambda: build(Dataset.from_dict({"input_ids": (CALIBRATION.float() + 0.5).tolist()})),
        ValueError,
        "non-integer",
    ),
    "malformed jsonl line": (lambda t: jsonl(t, RECORD + b'{"instruction": "a",\n'), ValueError, "line 2"),
    "jsonl that is not UTF-8": (lambda t: jsonl(t, RECORD + b'{"instruction": "\xff"}\n'), ValueError, "UTF-8"),
    "jsonl line that is a list": (lambda t: jsonl(t, b"[1, 2]\n"), ValueError, "not a JSON object"),
    "empty lora_target_modules": (lambda t: arguments(t, lora_target_modules=""), ValueError, "names no module"),
    "unknown eval_stitches": (lambda t: arguments(t, eval_stitches="foo"), ValueError, "eval_stitches"),
    "negative stitch_warmup_steps": (lambda t: arguments(t, stitch_warmup_steps=-1), ValueError, "stitch_warmup"),
    "NaN importance_temperature": (
        lambda t: arguments(t, importance_temperature=float("nan")),
        ValueError,
        "importance_temperature",
    ),
    "importance_eps above 1": (lambda t: arguments(t, importance_eps=2), ValueError, "importance_eps"),
    "train_stitches not integers": (lambda t: arguments(t, train_stitches="0,large"), ValueError, "train_stitches"),
    "negative distill_alpha": (lambda t: arguments(t, distill_alpha=-0.1), ValueError, "distill_alpha"),
    "stitch_weights not numbers": (
        lambda t: arguments(t, sampling="uniform", stitch_weights="2,x"),
        ValueError,
        "comma-separated numbers",
    ),
    "stitch_weights of zero": (
        lambda t: arguments(t, sampling="uniform", stitch_weights="1,0"),
        ValueError,
        "positive",
    ),
    "stitch_weights with learned sampling": (
        lambda t: arguments(t, sampling="importance", stitch_weights="2,1"),
        ValueError,
        "set sampling='uniform'",
    ),
    "stitch_weights not one per trained stitch": (
        lambda t: arguments(t, sampling="uniform", train_stitches="1,2", stitch_weights="2,1,1"),
        ValueError,
        "one share per stitch",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_named_error(case, tmp_path):
    factory, exception, word = CASES[case]
    with pytest.raises(exception, match=word):
        factory(tmp_path)()


def word_tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[3]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=words[0], bos_token=words[1], eos_token=words[2])


def test_tokenizers_are_compared_for_anchors_passed_as_models(tmp_path):
    small, large = make_pair("llama")
    base = ["<pad>", "<s>", "</s>", "<unk>"]
    for name, anchor, words in (
        ("small", small, base + [f"w{i}" for i in range(VOCAB - 4)]),
        ("large", large, base + [f"v{i}" for i in range(VOCAB - 4)]),
    ):
        anchor.save_pretrained(tmp_path / name)
        word_tokenizer(words).save_pretrained(tmp_path / name)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    large = AutoModelForCausalLM.from_pretrained(tmp_path / "large")
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        StitchedLlamaForCausalLM.from_anchors(small, large, calibration=CALIBRATION)


def test_a_warning_says_when_only_vocabulary_sizes_were_compared(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            build()
    finally:
        hf_logging.disable_propagation()
    assert any("Only the vocabulary sizes" in r.getMessage() for r in caplog.records)

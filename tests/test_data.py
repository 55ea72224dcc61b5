"""Instruction data: loading, rendering, response-only labels, truncation and collation (stitched_llama/data.py)."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from stitched_llama.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    builtin_instructions,
    collate_fn,
    detect_format,
    format_example,
    format_prompt,
    load_instruction_dataset,
    tokenize_example,
    tokenize_instructions,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Say bye."},
            {"role": "assistant", "content": "Bye now."},
        ]
    },
    {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]},
]


def byte_tokenizer(merges: list[tuple[str, str]] = (), split_words: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE: decodes back to the exact text, so labelled spans can be compared as strings.

    Like LLaMA tokenizers it adds BOS and has no pad token. `merges` (with `split_words=False`, so merges may
    cross word boundaries) let a token straddle the prompt/response boundary.
    """
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def labelled_runs(tokenizer, example) -> list[str]:
    """Decode every maximal run of labelled tokens, checking labels equal input_ids wherever they are set."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def unlabelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])


def write(records: list[dict], path) -> None:
    if path.suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------------------------
# Loading and format detection
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("records,fmt", [(ALPACA, "alpaca"), (CHAT, "chat")], ids=["alpaca", "chat"])
def test_load_files(tmp_path, suffix, records, fmt, chat_tokenizer):
    path = tmp_path / f"data{suffix}"
    write(records, path)
    dataset = load_instruction_dataset(path)
    assert len(dataset) == len(records)
    assert detect_format(dataset) == fmt
    # Files round-trip into records that render exactly like the originals.
    for loaded, original in zip(dataset, records):
        assert format_example(loaded, chat_tokenizer) == format_example(original, chat_tokenizer)


def test_dataset_and_dataset_dict_sources():
    dataset = Dataset.from_list(ALPACA)
    assert load_instruction_dataset(dataset) is dataset
    splits = DatasetDict(train=dataset, test=Dataset.from_list(ALPACA[:1]))
    assert len(load_instruction_dataset(splits)) == 2
    assert len(load_instruction_dataset(splits, split="test")) == 1
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        load_instruction_dataset(splits, split="validation")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_instruction_dataset(tmp_path / "missing.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("instruction,output\na,b\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.json, \.jsonl, \.parquet"):
        load_instruction_dataset(csv)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[ ]\n")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="has no records"):
        load_instruction_dataset(path)


def test_empty_parquet_and_dataset(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"instruction": pd.Series([], dtype=str), "output": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(ValueError, match="has no records"):
        load_instruction_dataset(path)
    with pytest.raises(ValueError, match="has no records"):
        load_instruction_dataset(Dataset.from_dict({"instruction": [], "output": []}))


def test_missing_fields_name_columns_and_fields(plain_tokenizer):
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    calls = (
        lambda: detect_format(dataset),
        lambda: load_instruction_dataset(dataset),
        lambda: tokenize_instructions(dataset, plain_tokenizer),
    )
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        for name in ("prompt", "completion", "`instruction`", "`output`", "`messages`"):
            assert name in message
    # `instruction` without `output` is not Alpaca either.
    with pytest.raises(ValueError, match="'instruction'"):
        detect_format(["instruction", "input"])


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", ALPACA, ids=["no_input", "input"])
def test_alpaca_fallback_labels_only_response(plain_tokenizer, record):
    example = tokenize_example(record, plain_tokenizer)
    template = ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(**record)
    assert ("### Input:" in prompt) == bool(record["input"])
    # BOS (added by the tokenizer) and the whole prompt are masked; the response and EOS are trained on.
    n_prompt = example["labels"].index(next(label for label in example["labels"] if label != IGNORE_INDEX))
    assert all(label == IGNORE_INDEX for label in example["labels"][:n_prompt])
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert plain_tokenizer.decode(example["input_ids"][:n_prompt]) == "<s>" + prompt
    assert labelled_runs(plain_tokenizer, example) == [record["output"] + "</s>"]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_chat_template_multi_turn_trains_every_assistant_turn(chat_tokenizer):
    example = tokenize_example(CHAT[0], chat_tokenizer)
    assert labelled_runs(chat_tokenizer, example) == ["Hi!<|im_end|>\n", "Bye now.<|im_end|>\n"]
    masked = unlabelled_text(chat_tokenizer, example)
    for text in ("Be brief.", "Say hi.", "Say bye.", "<|im_start|>user\n", "<|im_start|>assistant\n"):
        assert text in masked
    assert "Hi!" not in masked and "Bye now." not in masked
    # The template owns the special tokens: no BOS is added on top.
    assert example["input_ids"][0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_vs_alpaca_fallback(plain_tokenizer, chat_tokenizer):
    record = ALPACA[1]
    chat_text, _ = format_example(record, chat_tokenizer)
    assert (
        chat_text
        == "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
    )
    plain_text, _ = format_example(record, plain_tokenizer)
    assert plain_text == ALPACA_PROMPT.format(**record) + "2 plus 3 is 5.</s>"
    # Chat records without a template use the Alpaca prompt too: one exchange renders like an Alpaca record.
    chat_record = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
    alpaca_record = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert format_example(chat_record, plain_tokenizer) == format_example(alpaca_record, plain_tokenizer)
    # ... and several exchanges are all trained on.
    example = tokenize_example(CHAT[0], plain_tokenizer)
    assert labelled_runs(plain_tokenizer, example) == ["Hi!</s>", "Bye now.</s>"]
    assert unlabelled_text(plain_tokenizer, example).startswith("<s>Be brief.\n\n### Instruction:\nSay hi.")


def test_format_prompt_is_the_training_prefix(plain_tokenizer, chat_tokenizer):
    for tokenizer in (plain_tokenizer, chat_tokenizer):
        for record in ALPACA + CHAT:
            text, spans = format_example(record, tokenizer)
            assert format_prompt(record, tokenizer) == text[: spans[-1][0]]


def test_template_that_is_not_prefix_stable_is_refused():
    tokenizer = byte_tokenizer()
    # Like reasoning templates, it renders the last assistant turn differently from earlier ones.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [final]{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_example(CHAT[0], tokenizer)


def test_token_straddling_the_boundary_counts_as_response():
    # Without word splitting, "\n" + "P" merge into one token across the end of "### Response:\n".
    tokenizer = byte_tokenizer(merges=[("Ċ", "P")], split_words=False)
    example = tokenize_example(ALPACA[0], tokenizer)
    assert tokenizer.convert_tokens_to_ids("ĊP") in example["input_ids"]
    assert labelled_runs(tokenizer, example) == ["\nParis.</s>"]
    assert unlabelled_text(tokenizer, example) == "<s>" + ALPACA_PROMPT_NO_INPUT.format(**ALPACA[0])[:-1]


# ---------------------------------------------------------------------------------------------------------------
# Dataset tokenization: truncation and dropping
# ---------------------------------------------------------------------------------------------------------------


def test_tokenize_instructions_columns(tmp_path, chat_tokenizer):
    path = tmp_path / "chat.jsonl"
    write(CHAT, path)
    tokenized = tokenize_instructions(load_instruction_dataset(path), chat_tokenizer)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert tokenized[0] == tokenize_example(CHAT[0], chat_tokenizer)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_truncation_warns_and_drops_examples_without_response(plain_tokenizer, caplog, num_proc):
    records = [
        {"instruction": "Short.", "input": "", "output": "Ok."},
        {"instruction": "Long answer.", "input": "", "output": "word " * 80},  # truncated, keeps a response
        {"instruction": "Long question.", "input": "word " * 80, "output": "Ok."},  # response cut away
        {"messages": [{"role": "user", "content": "No answer."}]},  # never had a response
    ]
    dataset = Dataset.from_list([{"messages": _as_chat(r)} for r in records])
    lengths = [len(tokenize_example(r, plain_tokenizer)["input_ids"]) for r in dataset]
    max_length = 200
    assert lengths[0] < max_length < min(lengths[1], lengths[2]) and lengths[3] < max_length
    with caplog.at_level(logging.WARNING, logger="stitched_llama.data"):
        tokenized = tokenize_instructions(dataset, plain_tokenizer, max_length=max_length, num_proc=num_proc)
    assert len(tokenized) == 2
    assert [len(ids) for ids in tokenized["input_ids"]] == [lengths[0], max_length]
    assert all(any(label != IGNORE_INDEX for label in labels) for labels in tokenized["labels"])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("truncated" in m for m in messages) == 1
    assert any(f"2 of 4 examples are longer than max_length={max_length}" in m for m in messages)
    assert any("dropped 1 examples whose response starts after" in m for m in messages)
    assert any("dropped 1 examples that have no assistant response" in m for m in messages)


def _as_chat(record: dict) -> list[dict[str, str]]:
    if "messages" in record:
        return record["messages"]
    content = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": record["output"]}]


def test_max_length_defaults_to_and_is_clamped_to_model_max_length(plain_tokenizer, caplog):
    dataset = Dataset.from_list([{"instruction": "Long answer.", "output": "word " * 40}])
    example = tokenize_example(dataset[0], plain_tokenizer)
    length, limit = len(example["input_ids"]), example["labels"].count(IGNORE_INDEX) + 10
    assert len(tokenize_instructions(dataset, plain_tokenizer)["input_ids"][0]) == length  # 1024 by default
    assert len(tokenize_instructions(dataset, plain_tokenizer, model_max_length=limit)["input_ids"][0]) == limit
    with caplog.at_level(logging.WARNING, logger="stitched_llama.data"):
        tokenized = tokenize_instructions(dataset, plain_tokenizer, max_length=4096, model_max_length=limit)
    assert len(tokenized["input_ids"][0]) == limit
    assert any(f"max_length=4096 exceeds the model's maximum length {limit}" in r.getMessage() for r in caplog.records)


def test_nothing_left_to_train_on_is_an_error(plain_tokenizer):
    dataset = Dataset.from_list(ALPACA)
    with pytest.raises(ValueError, match="max_length=10"):
        tokenize_instructions(dataset, plain_tokenizer, max_length=10)


def test_bad_record_names_its_index(chat_tokenizer):
    dataset = Dataset.from_list([ALPACA[0], {"instruction": "", "input": "", "output": "x"}])
    with pytest.raises(ValueError, match="record 1: .*`instruction`"):
        tokenize_instructions(dataset, chat_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------


def test_collator_pads_right_with_pad_id_and_ignore_index(tiny_tokenizer):
    features = [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10], "attention_mask": [1, 1], "labels": [-100, 10]},
    ]
    left = copy.deepcopy(tiny_tokenizer)
    left.padding_side = "left"  # e.g. set for batched generation; training must still pad on the right
    for tokenizer in (tiny_tokenizer, left):
        batch = collate_fn(tokenizer)(copy.deepcopy(features))
        pad = tiny_tokenizer.pad_token_id
        assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, pad, pad]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
        assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
        assert batch["labels"].dtype == torch.long
    assert left.padding_side == "left"


def test_collator_without_pad_token_pads_with_eos(plain_tokenizer):
    assert plain_tokenizer.pad_token is None
    tokenized = tokenize_instructions(Dataset.from_list(ALPACA), plain_tokenizer)
    batch = collate_fn(plain_tokenizer)([tokenized[0], tokenized[1]])
    short = len(tokenized[0]["input_ids"])
    assert batch["input_ids"][0, short:].eq(plain_tokenizer.eos_token_id).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0, short:].eq(0).all()
    assert plain_tokenizer.pad_token is None  # the caller's tokenizer is left alone


# ---------------------------------------------------------------------------------------------------------------
# Built-in data
# ---------------------------------------------------------------------------------------------------------------


def test_builtin_instructions_tokenize(plain_tokenizer):
    dataset = builtin_instructions()
    assert 50 <= len(dataset) <= 80 and detect_format(dataset) == "alpaca"
    assert len(set(dataset["instruction"])) > 30 and any(dataset["input"])
    tokenized = tokenize_instructions(dataset, plain_tokenizer, max_length=512)
    assert len(tokenized) == len(dataset)
    assert labelled_runs(plain_tokenizer, tokenized[0]) == [dataset[0]["output"] + "</s>"]


# ---------------------------------------------------------------------------------------------------------------
# Real chat templates (tokenizers saved by benchmarks/prepare_anchors.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_chatml_templates(name):
    path = Path(os.environ.get("STITCHED_LLAMA_CACHE") or "~/.cache/stitched_llama").expanduser() / name
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"{path} not prepared; run benchmarks/prepare_anchors.py")
    tokenizer = AutoTokenizer.from_pretrained(path)
    for record in CHAT:
        example = tokenize_example(record, tokenizer)
        responses = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert labelled_runs(tokenizer, example) == [f"{r}<|im_end|>\n" for r in responses]
        masked = unlabelled_text(tokenizer, example)
        assert all(m["content"] in masked for m in record["messages"] if m["role"] != "assistant")


def test_plain_text_becomes_eos_joined_blocks(tiny_tokenizer):
    from stitched_llama.data import tokenize_texts

    eos = tiny_tokenizer.eos_token_id  # 2; word w{i} is id i + 4
    rows = tokenize_texts(["w1 w2 w3", "", "w4 w5"], tiny_tokenizer, block_size=3)
    assert rows["input_ids"] == [[5, 6, 7], [eos, 8, 9]]  # the empty text is skipped, a 1-token tail dropped
    assert rows["labels"] == rows["input_ids"] and rows["attention_mask"] == [[1, 1, 1]] * 2
    texts = ["w1 w2 w3 w4", "w5 w1"]
    assert tokenize_texts(texts, tiny_tokenizer, block_size=3)["input_ids"] == [[5, 6, 7], [8, eos, 9], [5, eos]]
    assert tokenize_texts(texts, tiny_tokenizer, block_size=3, drop_last=True)["input_ids"] == [[5, 6, 7], [8, eos, 9]]
    with pytest.raises(TypeError, match="wrap it as \\[text\\]"):
        tokenize_texts("w1 w2", tiny_tokenizer)
    with pytest.raises(ValueError, match="block_size=1"):
        tokenize_texts(["w1 w2"], tiny_tokenizer, block_size=1)

"""Instruction data for fine-tuning a palette: load records, render them, tokenize them with response-only labels.

Two record formats are understood, detected from the dataset's columns:

- Alpaca: `instruction`, optional `input`, `output`.
- chat: `messages`, a list of `{"role": ..., "content": ...}` with roles `system`, `user`, `assistant`.

When the tokenizer has a `chat_template`, every record is rendered with it (an Alpaca record becomes one user turn
and one assistant turn). Otherwise Alpaca records use the Stanford Alpaca prompt and chat records use
`ALPACA_CHAT_TEMPLATE`, its multi-turn form; the response is followed by the EOS token so the model learns to stop.

Labels are -100 everywhere except on the assistant responses (and the end-of-turn token closing each of them), so
the loss is the usual supervised fine-tuning loss on responses only.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # the label value cross-entropy skips in transformers' causal-LM losses
DEFAULT_MAX_LENGTH = 1024
SUPPORTED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The Alpaca prompt as a chat template, for chat records when the tokenizer has none. A single user/assistant
# exchange renders exactly as ALPACA_PROMPT_NO_INPUT + response + EOS. Separators sit before a user turn rather
# than after an assistant turn, so an assistant turn is exactly `content + eos_token`.
ALPACA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\n\n' }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ ('' if loop.first else '\n\n') + '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('ALPACA_CHAT_TEMPLATE supports the roles system (first message only), user and assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

RecordFormat = Literal["alpaca", "chat"]
Span = tuple[int, int]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_instruction_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    split: str | None = None,
) -> Dataset:
    """Load instruction records from a local file or take them from an existing dataset.

    Args:
        source: a `.json`, `.jsonl` or `.parquet` file (JSON may be an array of records or one record per line),
            a `datasets.Dataset` (returned as is), or a `datasets.DatasetDict`.
        split: for a `DatasetDict`, the split to use (default `"train"`). For a file, a split expression passed to
            `datasets.load_dataset` such as `"train[:100]"` (default `"train"`, the whole file).

    Returns:
        A `Dataset` with at least one record, in the Alpaca or chat format (see `detect_format`).

    Raises:
        FileNotFoundError: if `source` is a path to no file.
        ValueError: for an unsupported extension, no records, or columns that fit neither record format.
    """
    if isinstance(source, DatasetDict):
        split = split or "train"
        if split not in source:
            raise ValueError(f"split {split!r} is not in the DatasetDict, which has {list(source)}: pass one of them")
        dataset, name = source[split], f"split {split!r}"
    elif isinstance(source, Dataset):
        dataset, name = source, "the dataset"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        if not path.is_file():
            raise FileNotFoundError(
                f"instruction data {str(path)!r} is not a file: pass a local {supported} file, or load a Hub "
                "dataset with `datasets.load_dataset` and pass the resulting Dataset"
            )
        builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"instruction data {str(path)!r} has the unsupported extension {path.suffix!r}: use one of "
                f"{supported}, or load it yourself with `datasets.load_dataset` and pass the Dataset"
            )
        name = repr(str(path))
        # `datasets` fails on empty files with unhelpful errors (a bare StopIteration for .jsonl), so check first.
        if _file_is_empty(path, builder):
            raise ValueError(f"instruction data {name} has no records")
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path)
        dataset = load_dataset(builder, data_files=str(path), split=split or "train")
    else:
        raise TypeError(
            f"`source` must be a file path, a Dataset or a DatasetDict, got {type(source).__name__}: "
            "load other data with `datasets.load_dataset` first"
        )
    if len(dataset) == 0:
        raise ValueError(f"instruction data {name} has no records")
    detect_format(dataset)  # fail at load time, not deep inside training, when the columns fit neither format
    return dataset


def check_jsonl(path: str | os.PathLike) -> None:
    """Raise `ValueError` naming the file and the line of the first line that is not UTF-8 or not a JSON object.

    `datasets` reports these as a generic parse failure somewhere in the file; this says where and why.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} line {number} is not UTF-8 text ({error.reason}): save the file as UTF-8"
                ) from error
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path} line {number} is not valid JSON ({error.msg} at column {error.colno}): one record per "
                    'line, e.g. {"instruction": ..., "output": ...}'
                ) from error
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number} holds a {type(record).__name__}, not a JSON object (a record)")


def _file_is_empty(path: Path, builder: str) -> bool:
    if builder == "parquet":
        return pq.read_metadata(path).num_rows == 0
    with open(path, "rb") as f:
        head = f.read(4097)
    # An empty file, blank lines or an empty JSON array; a file longer than 4 KiB holds some record.
    return len(head) <= 4096 and b"".join(head.split()) in (b"", b"[]")


def detect_format(dataset_or_columns: Dataset | Sequence[str]) -> RecordFormat:
    """Tell whether records are chat (`messages`) or Alpaca (`instruction` + `output`); chat wins if both are present."""
    columns = dataset_or_columns.column_names if isinstance(dataset_or_columns, Dataset) else list(dataset_or_columns)
    if "messages" in columns:
        return "chat"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    raise ValueError(
        f"instruction data has columns {columns}, but needs either `instruction` and `output` (Alpaca records, "
        "optional `input`) or `messages` (chat records: a list of {'role': ..., 'content': ...}); rename the "
        "columns with `dataset.rename_column`"
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _alpaca_user_content(record: Mapping[str, Any]) -> str:
    instruction, extra = _alpaca_fields(record)
    return f"{instruction}\n\n{extra}" if extra else instruction


def _alpaca_fields(record: Mapping[str, Any]) -> tuple[str, str]:
    instruction, extra = record.get("instruction"), record.get("input") or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"Alpaca record has an empty or non-text `instruction` ({instruction!r}): {dict(record)}")
    if not isinstance(extra, str):
        raise ValueError(f"Alpaca record has a non-text `input` ({extra!r}): {dict(record)}")
    return instruction, extra


def _messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The record as a conversation: chat records as they are, Alpaca records as one user and one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ValueError(f"chat record has no list of messages in `messages`: {dict(record)}")
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"chat message {message!r} needs a `role` and a text `content`")
            if not isinstance(message.get("content"), str):
                raise ValueError(
                    f"chat message {message!r} has non-text `content`: only plain-text messages are supported"
                )
        # Drop extra keys (parquet/arrow fill missing ones with None, which some templates then render).
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        output = record["output"]
        if not isinstance(output, str):
            raise ValueError(f"Alpaca record has a non-text `output` ({output!r}): {dict(record)}")
        return [
            {"role": "user", "content": _alpaca_user_content(record)},
            {"role": "assistant", "content": output},
        ]
    raise ValueError(
        f"record has fields {sorted(record)}, but needs either `instruction` and `output` (Alpaca) or `messages` (chat)"
    )


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    template = None if _has_chat_template(tokenizer) else ALPACA_CHAT_TEMPLATE
    if template is not None and tokenizer.eos_token is None:
        raise ValueError(
            "the tokenizer has neither a chat_template nor an eos_token, so a response cannot be ended: set "
            "`tokenizer.eos_token` or `tokenizer.chat_template`"
        )
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def format_example(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[Span]]:
    """Render one record as training text and find its responses.

    Returns:
        `(text, spans)`: the full text, and for every assistant response the character span `(start, end)` of
        `text` to train on (the response and what closes it: EOS or the template's end-of-turn).

    Raises:
        ValueError: if the chat template is not prefix-stable, i.e. rendering the conversation up to a response
            (with `add_generation_prompt=True`) is not a prefix of rendering the whole conversation. Templates
            that rewrite earlier turns (e.g. dropping the reasoning of past turns) cannot mark responses this way.
    """
    if not _has_chat_template(tokenizer) and "messages" not in record:
        instruction, extra = _alpaca_fields(record)
        output = record.get("output")
        if not isinstance(output, str):
            raise ValueError(f"Alpaca record has a non-text `output` ({output!r}): {dict(record)}")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token to end responses with: set `tokenizer.eos_token`")
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=extra)
        text = prompt + output + tokenizer.eos_token
        return text, [(len(prompt), len(text))]

    messages = _messages(record)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"conversation {messages!r} starts with an assistant turn: it needs a user turn first")
        # Render the prefix up to this response and the prefix including it: the text between is the response.
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                f"the chat template is not prefix-stable: rendering the first {i} messages with "
                f"add_generation_prompt=True gives {prompt!r}, and the first {i + 1} give {upto!r}, which are not "
                f"prefixes of the whole conversation {text!r}. Responses cannot be located; use a template that "
                "renders earlier turns the same whatever follows them"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def format_prompt(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt to generate a response from, rendered exactly as in training.

    For an Alpaca record this is the prompt without its output; for a chat record, the conversation up to (not
    including) its last assistant turn, followed by the generation prompt. Tokenize it with
    `add_special_tokens=tokenizer.chat_template is None`, as `tokenize_example` does.
    """
    if not _has_chat_template(tokenizer) and "messages" not in record:
        instruction, extra = _alpaca_fields(record)
        return (ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=extra)
    if "messages" in record:
        messages = _messages(record)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        messages = [{"role": "user", "content": _alpaca_user_content(record)}]
    return _render(tokenizer, messages, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------

# A prompt and its response may merge into one token at their boundary (BPE); more divergence than this means
# the tokenizer does not tokenize prefixes consistently and labels cannot be placed.
_MAX_BOUNDARY_TOKENS = 3


def _token_boundary(tokenizer: PreTrainedTokenizerBase, prefix: str, ids: list[int], add_special_tokens: bool) -> int:
    """Number of tokens of `ids` (the whole text's) that cover `prefix`: tokenize the prefix and match."""
    prefix_ids = tokenizer(prefix, add_special_tokens=add_special_tokens)["input_ids"]
    common = 0
    for a, b in zip(prefix_ids, ids):
        if a != b:
            break
        common += 1
    # A token straddling the boundary is left out of the prefix, so it counts as part of what follows.
    if len(prefix_ids) - common > _MAX_BOUNDARY_TOKENS:
        raise ValueError(
            f"the tokenizer is not prefix-stable: {prefix!r} tokenizes to {prefix_ids[common:]} after its first "
            f"{common} tokens, but the whole text has {ids[common : len(prefix_ids)]} there. "
            "Responses cannot be located in tokens"
        )
    return common


def tokenize_example(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenize one record (without truncation) into `input_ids`, `attention_mask` and response-only `labels`.

    With a chat template the text carries its own special tokens (`add_special_tokens=False`); the Alpaca fallback
    lets the tokenizer add its usual ones (e.g. BOS).
    """
    text, spans = format_example(record, tokenizer)
    add_special_tokens = not _has_chat_template(tokenizer)
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for start_char, end_char in spans:
        start = _token_boundary(tokenizer, text[:start_char], ids, add_special_tokens)
        end = (
            len(ids) if end_char == len(text) else _token_boundary(tokenizer, text[:end_char], ids, add_special_tokens)
        )
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_instructions(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    model_max_length: int | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenize instruction records into causal-LM examples with labels on the responses only.

    Args:
        dataset: Alpaca or chat records (see `load_instruction_dataset`).
        tokenizer: the anchors' tokenizer; its `chat_template`, if any, renders the records.
        max_length: longest example in tokens; longer ones are truncated on the right, with one warning. Defaults
            to `model_max_length`, or 1024 when that is not given.
        model_max_length: the model's context length (e.g. `config.max_position_embeddings`); `max_length` is
            clamped to it, with a warning.
        num_proc: processes for `Dataset.map`.

    Returns:
        A `Dataset` with columns `input_ids`, `attention_mask` and `labels` (-100 outside the responses). Examples
        with no response token left (truncated away, or no assistant turn) are dropped, with a warning.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}: use load_instruction_dataset"
        )
    if len(dataset) == 0:
        raise ValueError("instruction data has no records")
    if max_length is None:
        max_length = model_max_length or DEFAULT_MAX_LENGTH
    elif model_max_length is not None and max_length > model_max_length:
        logger.warning(
            f"max_length={max_length} exceeds the model's maximum length {model_max_length}; using {model_max_length}"
        )
        max_length = model_max_length
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    detect_format(dataset)  # fail early, before any work, if neither format fits

    def tokenize_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": [], "_length": [], "_kept": []}
        for row, index in enumerate(indices):
            record = {key: values[row] for key, values in batch.items()}
            try:
                example = tokenize_example(record, tokenizer)
            except ValueError as error:
                raise ValueError(f"record {index}: {error}") from error
            length = len(example["input_ids"])
            labels = example["labels"][:max_length]
            out["input_ids"].append(example["input_ids"][:max_length])
            out["attention_mask"].append(example["attention_mask"][:max_length])
            out["labels"].append(labels)
            out["_length"].append(length)
            out["_kept"].append(any(label != IGNORE_INDEX for label in labels))
        return out

    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Tokenizing instructions",
    )
    # Statistics come from columns rather than from inside `map`, so they hold with num_proc and cached results.
    lengths, kept = list(tokenized["_length"]), list(tokenized["_kept"])
    truncated = sum(length > max_length for length in lengths)
    if truncated:
        logger.warning(
            f"{truncated} of {len(lengths)} examples are longer than max_length={max_length} tokens and were "
            f"truncated (the longest has {max(lengths)} tokens)"
        )
    cut_away = sum(not k and length > max_length for k, length in zip(kept, lengths))
    no_response = sum(not k and length <= max_length for k, length in zip(kept, lengths))
    if cut_away:
        logger.warning(
            f"dropped {cut_away} examples whose response starts after max_length={max_length} tokens, leaving "
            "nothing to train on; raise max_length or shorten the prompts"
        )
    if no_response:
        logger.warning(f"dropped {no_response} examples that have no assistant response to train on")
    if cut_away + no_response == len(kept):
        raise ValueError(
            f"no example has a response token within max_length={max_length}: raise max_length or check the data"
        )
    if cut_away or no_response:
        tokenized = tokenized.filter(lambda flags: flags, input_columns="_kept", batched=True, num_proc=num_proc)
    return tokenized.remove_columns(["_length", "_kept"])


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int = 512, drop_last: bool = False
) -> Dataset:
    """Plain text as causal-LM examples, every token scored: the texts joined by EOS, cut into `block_size` rows.

    For healing stitches on generic text, with no instruction format. The last block is kept when shorter, unless
    `drop_last` (every row then holds exactly `block_size` tokens, as benchmarks and pretraining want).
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of strings, not one string: wrap it as [text]")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("the plain-text data holds no text: pass at least one non-empty string")
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be at least 2 tokens (one to read, one to predict)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token to separate the texts: set `tokenizer.eos_token`")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) == block_size or (len(b) >= 2 and not drop_last)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks})


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


def collate_fn(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorForSeq2Seq:
    """A collator that pads `tokenize_instructions` examples on the right: `input_ids` with the pad token,
    `attention_mask` with 0 and `labels` with -100, returning PyTorch tensors.

    Padding goes on the right whatever `tokenizer.padding_side` says, because position ids count from the first
    token. A tokenizer without a pad token (common for LLaMA-family ones) pads with its EOS token instead: the
    attention mask hides the padding and its labels are -100, so the value never reaches the loss. The given
    tokenizer is not modified; the collator works on a copy when it needs either change.
    """
    if tokenizer.pad_token is None or tokenizer.padding_side != "right":
        if tokenizer.pad_token is None and tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad_token nor an eos_token to pad with: set `tokenizer.pad_token`"
            )
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )


# ----------------------------------------------------------------------------------------------------------------
# Built-in demo data
# ----------------------------------------------------------------------------------------------------------------

_ARITHMETIC = [(7, "+", 5), (12, "+", 9), (23, "+", 19), (40, "+", 2), (15, "-", 6), (30, "-", 12), (100, "-", 45)]
_ARITHMETIC += [(9, "-", 9), (3, "*", 4), (6, "*", 7), (8, "*", 8), (11, "*", 5), (2, "*", 50), (25, "+", 75)]
_OPS = {"+": ("plus", int.__add__), "-": ("minus", int.__sub__), "*": ("times", int.__mul__)}
_CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Spain", "Madrid"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Australia", "Canberra"),
    ("Germany", "Berlin"),
    ("India", "New Delhi"),
]
_DEFINITIONS = [
    ("ocean", "a very large body of salt water"),
    ("library", "a place where books are kept for people to read or borrow"),
    ("triangle", "a shape with three straight sides and three corners"),
    ("thermometer", "an instrument that measures temperature"),
    ("harvest", "the gathering of crops when they are ripe"),
    ("bridge", "a structure that carries a road or path over a river or gap"),
    ("planet", "a large body that moves in orbit around a star"),
    ("recipe", "a set of instructions for preparing a dish"),
    ("glacier", "a slow-moving mass of ice formed from compacted snow"),
    ("orchestra", "a large group of musicians who play instruments together"),
]
_REPEAT = [("apple", 2), ("river", 3), ("blue", 4), ("hello", 2), ("stone", 3), ("seven", 2), ("cloud", 3)]
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
_ANTONYMS = [("hot", "cold"), ("up", "down"), ("early", "late"), ("happy", "sad"), ("full", "empty")]
_PLURALS = [("mouse", "mice"), ("child", "children"), ("box", "boxes"), ("city", "cities"), ("foot", "feet")]
_SENTENCES = ["the cat sat on the mat", "birds fly south in winter", "she reads a book every week"]


def builtin_instructions() -> Dataset:
    """About 60 short Alpaca-style records (arithmetic, capitals, definitions, word games) for demos and smoke tests.

    Too small and too easy to teach a real model much; it exists so the training loop can run anywhere offline.
    """
    records: list[dict[str, str]] = []

    def add(instruction: str, output: str, input: str = "") -> None:
        records.append({"instruction": instruction, "input": input, "output": output})

    for a, op, b in _ARITHMETIC:
        word, fn = _OPS[op]
        add(f"What is {a} {word} {b}?", f"{a} {word} {b} is {fn(a, b)}.")
    for country, capital in _CAPITALS:
        add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
    for word, meaning in _DEFINITIONS:
        article = "An" if word[0] in "aeiou" else "A"
        add(f'Define the word "{word}".', f"{article} {word} is {meaning}.")
    for word, times in _REPEAT:
        add(f'Repeat the word "{word}" {_COUNT_WORDS[times]} times.', " ".join([word] * times))
    for word in ["stone", "planet", "garden"]:
        add("Reverse the letters of the following word.", word[::-1], input=word)
    for word, opposite in _ANTONYMS:
        add("Give the opposite of the following word.", opposite, input=word)
    for word, plural in _PLURALS:
        add("Write the plural of the following noun.", plural, input=word)
    for sentence in _SENTENCES:
        add("Count the words in the following sentence.", str(len(sentence.split())), input=sentence)
        add("Rewrite the following sentence in capital letters.", sentence.upper(), input=sentence)
    return Dataset.from_list(records)


__all__ = [
    "ALPACA_CHAT_TEMPLATE",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "check_jsonl",
    "tokenize_texts",
    "builtin_instructions",
    "collate_fn",
    "detect_format",
    "format_example",
    "format_prompt",
    "load_instruction_dataset",
    "tokenize_example",
    "tokenize_instructions",
]

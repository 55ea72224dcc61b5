"""What more than one command uses: the user error, the options several commands share (as argparse parent
parsers), folder checks, palette and tokenizer loading, data files, stitches, and number formatting.

Nothing heavy is imported here at module level: `stitched-llama --help` must not wait for torch or datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATTER = argparse.RawDescriptionHelpFormatter  # the descriptions' examples keep their line breaks
RUN_DEVICE = "where to run: auto (cuda if available, default), cpu, cuda:1..."


class CliError(Exception):
    """A user error: printed as one line on stderr after the command's usage, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Parsers: a command, and the options several commands share
# ----------------------------------------------------------------------------------------------------------------


def add_command(
    subparsers: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    description: str,
    parents: Iterable[argparse.ArgumentParser] = (),
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand's parser; `main` calls `args.run(args)` and prints `args.command_parser`'s usage on errors."""
    parser = subparsers.add_parser(
        name,
        help=run.__doc__.splitlines()[0],
        description=description,
        formatter_class=FORMATTER,
        allow_abbrev=False,
        parents=list(parents),
        **kwargs,
    )
    parser.set_defaults(run=run, command_parser=parser)
    return parser


def _option_group(title: str) -> tuple[argparse.ArgumentParser, Any]:
    """A parent parser with one titled group. Groups of the same title merge in the command's --help, after the
    command's own options."""
    parent = argparse.ArgumentParser(add_help=False)
    return parent, parent.add_argument_group(title)


def palette_argument(help: str = "palette folder") -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("palette_dir", metavar="PALETTE_DIR", help=help)
    return parent


def output_options(help: str, *, overwrite: bool = True, default: str | None = None) -> argparse.ArgumentParser:
    """`--out DIR` (required unless it has a default) and `--overwrite` (see `check_out_dir`)."""
    parent, group = _option_group("output")
    group.add_argument("--out", required=default is None, default=default, metavar="DIR", help=help)
    if overwrite:
        group.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    return parent


def tokenizer_option(default: str) -> argparse.ArgumentParser:
    parent, group = _option_group("loading")
    group.add_argument("--tokenizer", metavar="PATH", help=f"tokenizer folder or Hub id; default: {default}")
    return parent


def dtype_option(loads: str, default: str | None = "auto") -> argparse.ArgumentParser:
    parent, group = _option_group("loading")
    group.add_argument("--dtype", choices=DTYPES, default=default, help=f"dtype to load {loads} in (default: saved)")
    return parent


def device_option(help: str = RUN_DEVICE) -> argparse.ArgumentParser:
    parent, group = _option_group("loading")
    group.add_argument("--device", default="auto", help=help)
    return parent


def loading_options() -> list[argparse.ArgumentParser]:
    """How the commands that run a palette load it: --tokenizer, --dtype and --device."""
    return [tokenizer_option("the palette's"), dtype_option("the palette"), device_option()]


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) quotes its argument
        text = f"missing key {text}"
    return " ".join(text.split())


def human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(int(x))


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def safetensors_bytes(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Folders, devices, palettes and tokenizers
# ----------------------------------------------------------------------------------------------------------------


def torch_dtype(name: str | None) -> Any:
    if name is None or name == "auto":
        return name
    import torch

    return getattr(torch, name)


def torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise CliError(f"--device {name!r} is not usable here ({one_line(error)}): pass auto, cpu or cuda") from error
    return device


def check_out_dir(out: str | os.PathLike, overwrite: bool, what: str = "--out") -> Path:
    """Refuse to write a model over another one (stale shards would stay next to the new ones)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"{what} {str(path)!r} is a file: pass a folder to write to.")
    if (path / "config.json").exists() and not overwrite:
        raise CliError(
            f"{what} {str(path)!r} already holds a model: pass --overwrite to replace it, or choose another folder."
        )
    if overwrite and (path / "config.json").exists():
        for pattern in (*WEIGHT_PATTERNS, "model.safetensors.index.json"):
            for stale in path.glob(pattern):
                stale.unlink()
    return path


def _has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(palette_dir: str | os.PathLike, tokenizer_path: str | None, required: bool) -> Any:
    """The tokenizer given with --tokenizer, else the one saved in the palette folder, else None (or an error)."""
    from transformers import AutoTokenizer

    source = tokenizer_path or (palette_dir if _has_tokenizer(palette_dir) else None)
    if source is None:
        if required:
            raise CliError(
                f"{palette_dir} has no tokenizer: save the palette with a tokenizer "
                "(from_anchors(..., tokenizer=...)) or pass --tokenizer PATH"
            )
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure here means the folder does not hold a usable tokenizer
        raise CliError(
            f"could not load a tokenizer from {str(source)!r} ({one_line(error)}): pass --tokenizer PATH naming "
            "a folder or Hub id with the anchors' tokenizer"
        ) from error


def _check_palette_folder(path: str | os.PathLike) -> Path:
    """The folder, if it holds a complete saved palette; else a CliError saying what is wrong and what to do."""
    folder = Path(path)
    if not folder.exists():
        raise CliError(
            f"palette folder {str(path)!r} does not exist: pass a folder written by `stitched-llama build` "
            "(or the `palette/` folder that `stitched-llama train` writes)"
        )
    if not folder.is_dir():
        raise CliError(f"{str(path)!r} is a file, not a palette folder: pass the folder that holds config.json")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CliError(
            f"{str(path)!r} has no config.json: it is not a saved palette, or an incomplete one. Save it again "
            "(`stitched-llama build SMALL LARGE --out DIR` or `save_pretrained`)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise CliError(
            f"{config_file} is not a valid JSON config ({one_line(error)}): save the palette again"
        ) from error
    if model_type != "stitched_llama":
        raise CliError(
            f"{str(path)!r} holds a {model_type!r} model, not a palette: build a palette from two anchors with "
            "`stitched-llama build SMALL LARGE --out DIR`"
        )
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise CliError(
            f"{str(path)!r} has a config.json but no weights (*.safetensors): the palette folder is incomplete; "
            "save it again"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            raise CliError(f"{index} is corrupted ({one_line(error)}): save the palette again") from error
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise CliError(f"{str(path)!r} lacks the weight shards {absent}: the palette folder is incomplete")
    return folder


def load_palette(
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    need_tokenizer: bool = False,
    dtype: str | None = None,
    device: str | None = None,
) -> Any:
    """Load a saved palette, checking the folder first so that a bad one gets a clear one-line error."""
    folder = _check_palette_folder(path)

    from ..modeling_stitched_llama import StitchedLlamaForCausalLM

    try:
        palette, info = StitchedLlamaForCausalLM.from_pretrained(
            folder, dtype=torch_dtype(dtype) or "auto", output_loading_info=True
        )
    except Exception as error:  # noqa: BLE001 - corrupted files raise anything from OSError to SafetensorError
        raise CliError(f"could not load the palette in {str(path)!r}: {one_line(error)}") from error
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = missing or mismatched
        raise CliError(
            f"the weights in {str(path)!r} do not match its config ({len(bad)} tensors missing or of the wrong "
            f"shape, e.g. {bad[:3]}): the palette folder is incomplete or corrupted; save it again"
        )
    palette.tokenizer = _load_tokenizer(folder, tokenizer, required=need_tokenizer)
    if palette.tokenizer is not None and len(palette.tokenizer) > palette.config.vocab_size:
        raise CliError(
            f"the tokenizer has {len(palette.tokenizer)} tokens but the palette's vocab_size is "
            f"{palette.config.vocab_size}: pass the anchors' tokenizer with --tokenizer PATH"
        )
    if device is not None:
        palette.to(torch_device(device))
    return palette.eval()


def context_limit(palette: Any) -> int:
    config = palette.config
    return min(config.small_config.max_position_embeddings, config.large_config.max_position_embeddings)


# ----------------------------------------------------------------------------------------------------------------
# Stitches
# ----------------------------------------------------------------------------------------------------------------


def stitch_index(palette: Any, value: str | int) -> int:
    """A stitch given as an index (negative from the end), `small` or `large`, checked against the palette."""
    count = palette.num_stitches
    text = str(value).strip().lower()
    named = {"small": 0, "large": -1}
    try:
        k = named[text] if text in named else int(text)
        return palette.config.resolve_stitch(k)
    except ValueError:
        raise CliError(
            f"unknown stitch {value!r}: this palette has {count} stitches, pass an index in 0..{count - 1} "
            "(0 or `small` = small anchor, -1 or `large` = large anchor); `/stitches` in chat or the table "
            "printed by `stitched-llama build` lists them"
        ) from None


def stitch_label(palette: Any, k: int) -> str:
    return f"stitch {k} {palette.config.stitch_name(k)}, {palette.config.stitch_kind(k)}"


def stitch_table(palette: Any, active: int | None = None) -> str:
    """The stitch table with deployed stitches, eval perplexities when known, and the active stitch marked."""
    metrics = palette.stitch_report.get("metrics", {})
    deployed = set(palette.config.deployed_stitches or [])
    marks = active is not None  # a first column marking the active stitch with ">"
    lines = [
        ("|   " if marks else "") + "| stitch | (n, j) | kind | layers | params | FLOPs/token | eval ppl | deployed |",
        ("|---" if marks else "") + "|---:|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in palette.stitch_table():
        k = r["stitch"]
        ppl = metrics.get(str(k), {}).get("eval_perplexity")
        lines.append(
            (f"| {'>' if k == active else ' '} " if marks else "")
            + f"| {k} | {r['name']} | {r['kind']} | {r['layers']} | "
            f"{human(r['params'])} | {human(r['flops_per_token'])} | "
            f"{'' if ppl is None else f'{ppl:.4g}'} | {'yes' if k in deployed else ''} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------------------


def _paragraphs(path: Path) -> list[str]:
    """A text file as paragraphs (blocks separated by blank lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"{str(path)!r} is not UTF-8 text ({error}): pass a plain-text .txt file") from error
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_data(path_str: str, what: str) -> tuple[str, Any]:
    """Read a data file as `("texts", [str, ...])` (.txt, or records with a `text` field) or `("records", Dataset)`
    (instruction records: Alpaca `instruction`/`output` or chat `messages`)."""
    path = Path(path_str)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + RECORD_SUFFIXES:
        raise CliError(
            f"{what} {path_str!r} has the unsupported extension {suffix!r}: use .txt (plain text) or "
            ".jsonl/.json/.parquet (instruction records, or records with a `text` field)"
        )
    if not path.is_file():
        raise CliError(f"{what} {path_str!r} is not a file: check the path")
    if suffix in TEXT_SUFFIXES:
        texts = _paragraphs(path)
        if not texts:
            raise CliError(f"{what} {path_str!r} has no text")
        return "texts", texts

    from datasets import load_dataset

    from ..data import check_jsonl, detect_format, load_instruction_dataset

    if path.stat().st_size == 0:
        raise CliError(f"{what} {path_str!r} is empty: it needs at least one record")
    if suffix == ".jsonl":
        check_jsonl(path)
    try:
        dataset = load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise CliError(f"could not read {what} {path_str!r}: {one_line(error)}") from error
    columns = dataset.column_names
    if "text" in columns and "messages" not in columns and not {"instruction", "output"} <= set(columns):
        texts = [t for t in dataset["text"] if isinstance(t, str) and t.strip()]
        if not texts:
            raise CliError(f"{what} {path_str!r} has a `text` column but no text in it")
        return "texts", texts
    detect_format(dataset)  # a clear error naming the columns when they fit no format
    return "records", load_instruction_dataset(dataset)


def evaluation_data(path: str, tokenizer: Any, limit: int, max_length: int, max_records: int | None) -> Any:
    """(dataset, collator, kind) for `evaluate_palette`: raw texts, or instruction records tokenized as in training."""
    from ..data import collate_fn, tokenize_instructions

    kind, data = read_data(path, "--data")
    if max_records is not None:
        data = data[:max_records] if kind == "texts" else data.select(range(min(max_records, len(data))))
    if kind == "texts":
        return data, None, "plain text (every token scored)"
    tokenized = tokenize_instructions(data, tokenizer, max_length=min(max_length, limit), model_max_length=limit)
    return tokenized, collate_fn(tokenizer), "instruction records (responses scored)"

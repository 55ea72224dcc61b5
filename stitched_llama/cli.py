"""The `stitched-llama` command line: build, train, evaluate, export and chat with a palette of stitched models.

    stitched-llama build SMALL LARGE --out palette --calibration domain.txt   # palette + least-squares stitches
    stitched-llama train palette --train-file train.jsonl --output_dir run --max_steps 2000   # ESTA, merged
    stitched-llama evaluate run/palette --data val.jsonl --out run/eval     # Pareto table + plot
    stitched-llama export run/palette --stitch best --max-params 1.5B --out slim   # one stitch alone
    stitched-llama chat run/palette --stitch 3                              # talk to any stitch, switch live
    stitched-llama demo                                                     # all of it on the built-in family

User errors (a missing or incomplete folder, an unknown stitch, a bad budget...) end with one line on stderr
and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BUDGETS = (  # (option, select_stitch keyword, budget kind of `budget.parse_budget`)
    ("--max-params", "max_params", "params"),
    ("--max-flops", "max_flops", "flops"),
    ("--max-latency-ms", "max_latency_ms", "ms"),
    ("--max-memory-mb", "max_memory_mb", "mb"),
)


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: folders, palettes, tokenizers, data, stitches
# ----------------------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) quotes its argument
        text = f"missing key {text}"
    return " ".join(text.split())


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(int(x))


def _human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _safetensors_bytes(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _dtype(name: str | None) -> Any:
    if name is None or name == "auto":
        return name
    import torch

    return getattr(torch, name)


def _check_out_dir(out: str | os.PathLike, overwrite: bool, what: str = "--out") -> Path:
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
            f"could not load a tokenizer from {str(source)!r} ({_one_line(error)}): pass --tokenizer PATH naming "
            "a folder or Hub id with the anchors' tokenizer"
        ) from error


def _load_palette(
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    need_tokenizer: bool = False,
    dtype: str | None = None,
    device: str | None = None,
) -> Any:
    """Load a saved palette, checking the folder first so that a bad one gets a clear one-line error."""
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
            f"{config_file} is not a valid JSON config ({_one_line(error)}): save the palette again"
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
            raise CliError(f"{index} is corrupted ({_one_line(error)}): save the palette again") from error
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise CliError(f"{str(path)!r} lacks the weight shards {absent}: the palette folder is incomplete")

    from .modeling_stitched_llama import StitchedLlamaForCausalLM

    try:
        palette, info = StitchedLlamaForCausalLM.from_pretrained(
            folder, dtype=_dtype(dtype) or "auto", output_loading_info=True
        )
    except Exception as error:  # noqa: BLE001 - corrupted files raise anything from OSError to SafetensorError
        raise CliError(f"could not load the palette in {str(path)!r}: {_one_line(error)}") from error
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
        palette.to(_device(device))
    return palette.eval()


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise CliError(f"--device {name!r} is not usable here ({_one_line(error)}): pass auto, cpu or cuda") from error
    return device


def _stitch_index(palette: Any, value: str | int) -> int:
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


def _stitch_label(palette: Any, k: int) -> str:
    return f"stitch {k} {palette.config.stitch_name(k)}, {palette.config.stitch_kind(k)}"


def _stitch_table(palette: Any, active: int | None = None) -> str:
    """The stitch table with deployed stitches, eval perplexities when known, and the active stitch marked."""
    metrics = palette.config.stitch_metrics or {}
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
            f"{_human(r['params'])} | {_human(r['flops_per_token'])} | "
            f"{'' if ppl is None else f'{ppl:.4g}'} | {'yes' if k in deployed else ''} |"
        )
    return "\n".join(lines)


def _context_limit(palette: Any) -> int:
    config = palette.config
    return min(config.small_config.max_position_embeddings, config.large_config.max_position_embeddings)


def _paragraphs(path: Path) -> list[str]:
    """A text file as paragraphs (blocks separated by blank lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"{str(path)!r} is not UTF-8 text ({error}): pass a plain-text .txt file") from error
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_data(path_str: str, what: str) -> tuple[str, Any]:
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

    from .data import check_jsonl, detect_format, load_instruction_dataset

    if path.stat().st_size == 0:
        raise CliError(f"{what} {path_str!r} is empty: it needs at least one record")
    if suffix == ".jsonl":
        check_jsonl(path)
    try:
        dataset = load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise CliError(f"could not read {what} {path_str!r}: {_one_line(error)}") from error
    columns = dataset.column_names
    if "text" in columns and "messages" not in columns and not {"instruction", "output"} <= set(columns):
        texts = [t for t in dataset["text"] if isinstance(t, str) and t.strip()]
        if not texts:
            raise CliError(f"{what} {path_str!r} has a `text` column but no text in it")
        return "texts", texts
    detect_format(dataset)  # a clear error naming the columns when they fit no format
    return "records", load_instruction_dataset(dataset)


def _parse_stitch_pairs(value: str) -> list[tuple[int, int]]:
    pairs = []
    for item in value.replace(" ", "").strip(";").split(";"):
        match = re.fullmatch(r"\(?(\d+),(\d+)\)?", item)
        if match is None:
            raise CliError(
                f'--stitches {value!r} is not a list of n,j pairs: write them as "n,j;n,j", e.g. "4,7;2,4" '
                "(n small-anchor layers kept, j the first large-anchor layer run)"
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def _parse_budgets(args: argparse.Namespace) -> dict[str, str]:
    """The budgets given, checked (units, sign) before anything heavy is loaded."""
    from .budget import parse_budget

    budgets = {}
    for option, keyword, kind in BUDGETS:
        value = getattr(args, keyword)
        if value is not None:
            if str(value).strip().startswith("-"):
                raise CliError(f"{option} {value!r} must be positive: a budget is an upper limit, e.g. {option} 1.5B")
            parse_budget(option, value, kind)  # raises ValueError naming the option, the value and the units
            budgets[keyword] = value
    return budgets


def _compact_training_output(trainer: Any) -> None:
    """Replace the Trainer's log printing (a dict of ~4 values per stitch) by one short line per log."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    def line(logs: dict, state: Any) -> str | None:
        if "loss" in logs:
            parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            trained = sorted(int(k.split("_")[1].split("/")[0]) for k in logs if k.endswith("/loss"))
            if trained:
                parts.append(f"sampled stitches {','.join(map(str, trained))}")
            return "  ".join(parts)
        evals = sorted(
            (k for k in logs if re.fullmatch(r"\w+_stitch\d+_loss", k)), key=lambda k: int(k[:-5].split("stitch")[-1])
        )
        if evals:
            out = []
            for key in evals:
                k = key[:-5].split("stitch")[-1]
                ppl = logs.get(key.replace("_loss", "_perplexity"))
                out.append(f"eval stitch {k}: loss {logs[key]:.4f}" + (f", perplexity {ppl:.4g}" if ppl else ""))
            return "\n".join(out)
        if "train_runtime" in logs:
            return f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s, mean loss {logs.get('train_loss', float('nan')):.4f}"
        rest = {k: v for k, v in logs.items() if not k.startswith("stitch_") and k != "total_flos"}
        return str({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in rest.items()}) if rest else None

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(logs or {}, state) if state.is_world_process_zero else None
            if text:
                (self.training_bar.write if self.training_bar is not None else print)(text)

    class CompactPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(logs or {}, state) if state.is_world_process_zero else None
            if text:
                print(text, flush=True)

    had_bars = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(CompactProgress() if had_bars else CompactPrinter())


def _render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, Any]:
    """The chat so far rendered as in training (`data.format_prompt`), and its token ids."""
    from .data import format_prompt

    text = format_prompt({"messages": messages}, tokenizer)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None), return_tensors="pt")
    return text, ids["input_ids"]


def _generate(
    palette: Any,
    tokenizer: Any,
    input_ids: Any,
    stitch: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    streamer: Any = None,
) -> str:
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = palette.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = palette.generate(
            input_ids.to(device),
            attention_mask=torch.ones_like(input_ids).to(device),
            max_new_tokens=max_new_tokens,
            stitch=stitch,
            eos_token_id=eos,
            pad_token_id=pad,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------------


def _calibration(files: list[str], tokenizer: Any, max_records: int, max_length: int) -> Any:
    """Token ids of the calibration files (at most `max_records` texts or records in all), as a Dataset."""
    from datasets import Dataset

    from .data import tokenize_instructions

    if tokenizer is None:
        raise CliError(
            "--calibration needs the anchors' tokenizer, but SMALL has none: pass --tokenizer PATH (a folder or "
            "Hub id holding it)"
        )
    ids: list[list[int]] = []
    for name in files:
        left = max_records - len(ids)
        if left <= 0:
            break
        kind, data = _read_data(name, "calibration file")
        if kind == "texts":
            ids += tokenizer(data[:left])["input_ids"]
        else:
            records = data.select(range(min(left, len(data))))
            ids += tokenize_instructions(records, tokenizer, max_length=max_length)["input_ids"]
    return Dataset.from_dict({"input_ids": ids})


def _check_anchor(name: str, role: str) -> None:
    looks_local = os.path.sep in name or name.startswith(".") or name.startswith("~")
    if looks_local and not Path(name).expanduser().exists():
        raise CliError(f"{role} anchor {name!r} does not exist: pass a local model folder or a Hub id")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise CliError(f"{role} anchor {name!r} is a folder without config.json: pass a saved model folder")


def _searched_palette(args: argparse.Namespace, stitches: Any, build_kwargs: dict, load_kwargs: dict) -> Any:
    """`build --search K`: measure the candidates on --search-data, keep the best stitch of each of K budgets."""
    from transformers import AutoModelForCausalLM

    from .configuration_stitched_llama import StitchedLlamaConfig
    from .search import candidate_stitches, format_search_table, layer_skip_blocks, search_palette

    if args.search_data is None:
        raise CliError("--search K needs --search-data FILE: held-out text (or records) to measure the stitches on")
    if args.search < 1:
        raise CliError(f"--search {args.search} must be at least 1 budget")
    small = AutoModelForCausalLM.from_pretrained(args.small, **load_kwargs).eval()
    large = AutoModelForCausalLM.from_pretrained(args.large, **load_kwargs).eval()
    tokenizer = build_kwargs["tokenizer"]
    heldout, collator, _ = _evaluation_data(
        args.search_data, tokenizer, large.config.max_position_embeddings, args.max_length, None
    )
    if stitches is None:
        sizes = [int(v) for v in args.skip_blocks.split(",") if v.strip()] if args.skip_blocks else []
        calibration = build_kwargs["calibration"]
        blocks = layer_skip_blocks(large, calibration, tokenizer, sizes, max_length=args.max_length) if sizes else []
        config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
        stitches = candidate_stitches(config, blocks)
    palette, rows = search_palette(
        small, large, stitches, heldout=heldout, num_budgets=args.search,
        evaluate_kwargs={"collator": collator, "progress": False}, **build_kwargs,
    )  # fmt: skip
    print(f"\nSearch: {len(rows)} stitches measured on {args.search_data}, the best of {args.search} budgets kept:\n")
    print(format_search_table(rows))
    return palette


def build(args: argparse.Namespace) -> int:
    """Build a palette between two anchors, fit its stitching layers by least squares, and save it."""
    from transformers import AutoTokenizer

    from .modeling_stitched_llama import StitchedLlamaForCausalLM

    if args.calibration_records < 1:
        raise CliError(f"--calibration-records {args.calibration_records} must be at least 1")
    if args.max_length < 2:
        raise CliError(f"--max-length {args.max_length} must be at least 2 tokens")
    stitches = _parse_stitch_pairs(args.stitches) if args.stitches else None
    _check_anchor(args.small, "small")
    _check_anchor(args.large, "large")
    out = _check_out_dir(args.out, args.overwrite)

    tokenizer = None
    source = args.tokenizer or args.small
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001
        if args.tokenizer:
            raise CliError(f"could not load the tokenizer {args.tokenizer!r}: {_one_line(error)}") from error
        print(f"note: no tokenizer found in {args.small!r}; the palette is saved without one (pass --tokenizer PATH)")
    calibration = None
    if args.calibration:
        calibration = _calibration(args.calibration, tokenizer, args.calibration_records, args.max_length)
        tokens = sum(len(x) for x in calibration["input_ids"])
        print(f"calibration: {len(calibration)} sequences, {tokens:,} tokens from {', '.join(args.calibration)}")
    else:
        print("calibration: none given, fitting on random tokens (pass --calibration FILE for better stitches)")

    kwargs = {} if args.dtype is None else {"dtype": _dtype(args.dtype)}
    build_kwargs = dict(
        calibration=calibration,
        tokenizer=tokenizer,
        share_stitch_layers=not args.no_share_stitch_layers,
        map_first_token=not args.no_map_first_token,
        ridge=args.ridge,
        max_length=args.max_length,
    )
    try:
        if args.search:
            palette = _searched_palette(args, stitches, build_kwargs, kwargs)
        else:
            palette = StitchedLlamaForCausalLM.from_anchors(
                args.small, args.large, stitches=stitches, **build_kwargs, **kwargs
            )
    except OSError as error:
        raise CliError(f"could not load the anchors: {_one_line(error)}") from error
    print(f"\nPalette of {palette.num_stitches} stitches between {args.small} and {args.large}:\n")
    print(palette.format_stitch_table())
    errors = getattr(palette, "stitch_fit_errors", {})
    if errors:
        print("\nRelative least-squares fit error per stitching layer (0 = exact, 1 = no better than zero):")
        print("  " + ", ".join(f"P_{key}: {value:.3f}" for key, value in errors.items()))
    palette.save_pretrained(out)
    print(f"\nPalette saved to {out} ({_human_bytes(_safetensors_bytes(out))} of weights)")
    print(f"next: stitched-llama train {out} --train-file TRAIN.jsonl --output_dir RUN_DIR")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------

TRAIN_DESCRIPTION = """\
Fine-tune every stitch of a palette in one run with ESTA (shared LoRA + stitch-specific biases, importance
sampling of stitches), evaluate each stitch, choose the stitches to deploy, merge the LoRA into the anchors and
save the merged palette (with its tokenizer) to <output_dir>/palette. The report is <output_dir>/esta_report.json.

  stitched-llama train palette --train-file train.jsonl --eval-file val.jsonl --output_dir run \\
      --max_steps 2000 --per_device_train_batch_size 8 --learning_rate 2e-4

Data: .json/.jsonl/.parquet instruction records (Alpaca `instruction`/`input`/`output`, or chat `messages`), or
plain text with --text FILE... (every token scored). Distil from the frozen large anchor with --distill_alpha 0.5.
Every TrainingArguments flag works (--max_steps, --learning_rate, --save_steps, --resume_from_checkpoint last,
--use_cpu, --bf16, ...), plus the stitch flags: --method esta|lora-no-bias|snnet-full, --sampling
importance|uniform, --num_deployed_stitches, --importance_temperature, --lora_r, --lora_target_modules, ..."""


@dataclasses.dataclass
class TrainDataArguments:
    """The `train` command's own options (the rest are `StitchTrainingArguments`)."""

    train_file: str = dataclasses.field(
        default=None,
        metadata={"help": "Training records: .json/.jsonl/.parquet (Alpaca or chat). This or --text is required."},
    )
    text: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Plain-text files (.txt, or records with a `text` field) to train on instead, every token "
            "scored: generic text to heal stitches with. Cut into --max-length blocks; 10%% are held out."
        },
    )
    eval_file: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out records; default: 10%% of the training records (at most 500) are held out."},
    )
    max_length: int = dataclasses.field(default=512, metadata={"help": "Longest training example, in tokens."})
    tokenizer: str | None = dataclasses.field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: the one saved with the palette."}
    )


def _train_parser() -> Any:
    from transformers import HfArgumentParser

    from .trainer import StitchTrainingArguments

    parser = HfArgumentParser(
        (TrainDataArguments, StitchTrainingArguments),
        prog="stitched-llama train",
        usage="stitched-llama train PALETTE_DIR --train-file FILE --output_dir DIR [training flags]",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("palette_dir", metavar="PALETTE_DIR", help="Palette folder (`stitched-llama build` output).")
    return parser


def _held_out(dataset: Any, seed: int, what: str) -> tuple[Any, Any]:
    """(train, eval): 10% (at most 500) held out, or the training data itself when it is too small to split."""
    if len(dataset) < 10:
        print(f"no --eval-file and only {len(dataset)} {what}: evaluating on the training {what}")
        return dataset, dataset
    held_out = min(500, max(1, len(dataset) // 10))
    split = dataset.train_test_split(test_size=held_out, seed=seed)
    print(f"no --eval-file: holding out {held_out} of the training {what} for evaluation")
    return split["train"], split["test"]


def _record_splits(data_args: Any, tokenizer: Any, max_length: int, limit: int, seed: int) -> tuple[Any, Any]:
    from .data import tokenize_instructions

    kind, records = _read_data(data_args.train_file, "--train-file")
    if kind != "records":
        raise CliError(
            f"--train-file {data_args.train_file!r} holds plain text: pass it as --text, or pass instruction "
            "records (.jsonl with `instruction`/`output` or `messages`)"
        )
    if data_args.eval_file:
        kind, eval_records = _read_data(data_args.eval_file, "--eval-file")
        if kind != "records":
            raise CliError(f"--eval-file {data_args.eval_file!r} holds plain text; pass instruction records")
    else:
        records, eval_records = _held_out(records, seed, "records")
    return tuple(
        tokenize_instructions(data, tokenizer, max_length=max_length, model_max_length=limit)
        for data in (records, eval_records)
    )


def _text_splits(data_args: Any, tokenizer: Any, max_length: int, seed: int) -> tuple[Any, Any]:
    from .data import tokenize_texts

    def blocks(paths: list[str], option: str) -> Any:
        texts = []
        for path in paths:
            kind, data = _read_data(path, option)
            if kind != "texts":
                raise CliError(f"{option} {path!r} holds instruction records: pass it as --train-file")
            texts += data
        return tokenize_texts(texts, tokenizer, block_size=max_length)

    train_data = blocks(data_args.text, "--text")
    if data_args.eval_file:
        return train_data, blocks([data_args.eval_file], "--eval-file")
    return _held_out(train_data, seed, "text blocks")


def train(args: argparse.Namespace) -> int:
    """Fine-tune all stitches with ESTA, evaluate, deploy, merge and save (see `stitched-llama train --help`)."""
    parser = _train_parser()
    raw = parser.parse_args(args.train_argv)  # argparse errors (missing PALETTE_DIR, bad choices) exit 2 here
    if (raw.train_file is None) == (raw.text is None):
        parser.error("pass one of --train-file FILE (instruction records) or --text FILE... (plain text)")
    if raw.output_dir is None:
        parser.error("--output_dir DIR is required (checkpoints, the report and the merged palette go there)")
    data_args, training_args, _ = parser.parse_args_into_dataclasses(args=args.train_argv)

    from .data import collate_fn
    from .esta import merge_esta, trainable_parameters
    from .trainer import REPORT, StitchTrainer

    if data_args.max_length < 2:
        raise CliError(f"--max-length {data_args.max_length} must be at least 2 tokens")
    palette = _load_palette(raw.palette_dir, tokenizer=data_args.tokenizer, need_tokenizer=True)
    tokenizer = palette.tokenizer
    limit = _context_limit(palette)
    max_length = min(data_args.max_length, limit)
    if data_args.text is not None:
        train_data, eval_data = _text_splits(data_args, tokenizer, max_length, training_args.seed)
    else:
        train_data, eval_data = _record_splits(data_args, tokenizer, max_length, limit, training_args.seed)
    trainer = StitchTrainer(
        model=palette,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collate_fn(tokenizer),
    )
    _compact_training_output(trainer)
    report = trainable_parameters(trainer.model)
    print(
        f"ESTA ({training_args.method}, {training_args.sampling} sampling) on {palette.num_stitches} stitches: "
        f"{report['trainable']:,} trainable parameters of {report['total']:,} ({report['trainable_percent']:.2f}%)"
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.evaluate()
    deployed = trainer.deploy()  # again, now with the final eval metrics in the report

    merged = merge_esta(trainer.model)
    merged.tokenizer = tokenizer
    out = Path(training_args.output_dir) / "palette"
    if trainer.args.should_save:
        merged.save_pretrained(out)
    print()
    print(_stitch_table(merged))
    print(f"\ndeployed stitches: {deployed}")
    print(f"merged palette saved to {out}; report in {Path(training_args.output_dir) / REPORT}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------


def _stitch_selection(palette: Any, value: str) -> Any:
    if value in ("all", "deployed"):
        return value
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise CliError(f"--stitches {value!r} names no stitch: pass all, deployed or indices such as 0,3,5")
    return [_stitch_index(palette, v) for v in items]


def _evaluation_data(path: str, tokenizer: Any, limit: int, max_length: int, max_records: int | None) -> Any:
    """(dataset, collator, kind) for `evaluate_palette`: raw texts, or instruction records tokenized as in training."""
    from .data import collate_fn, tokenize_instructions

    kind, data = _read_data(path, "--data")
    if max_records is not None:
        data = data[:max_records] if kind == "texts" else data.select(range(min(max_records, len(data))))
    if kind == "texts":
        return data, None, "plain text (every token scored)"
    tokenized = tokenize_instructions(data, tokenizer, max_length=min(max_length, limit), model_max_length=limit)
    return tokenized, collate_fn(tokenizer), "instruction records (responses scored)"


def evaluate(args: argparse.Namespace) -> int:
    """Loss and perplexity of each stitch next to its cost: markdown/CSV/JSON tables and a Pareto plot."""
    from .evaluation import REPORT_FILES, evaluate_palette, format_markdown
    from .model_card import write_model_card

    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_records is not None and args.max_records < 1:
        raise CliError(f"--max-records {args.max_records} must be at least 1")
    palette = _load_palette(
        args.palette_dir, tokenizer=args.tokenizer, need_tokenizer=True, dtype=args.dtype, device=args.device
    )
    stitches = _stitch_selection(palette, args.stitches)
    limit = _context_limit(palette)
    dataset, collator, kind = _evaluation_data(args.data, palette.tokenizer, limit, args.max_length, args.max_records)
    which = {"all": f"all {palette.num_stitches} stitches", "deployed": "the deployed stitches"}
    which = which[stitches] if isinstance(stitches, str) else f"stitches {stitches}"
    print(f"evaluating {which} on {len(dataset)} {kind}")
    rows = evaluate_palette(
        palette,
        dataset,
        stitches=stitches,
        batch_size=args.batch_size,
        output_dir=args.out,
        collator=collator,
        tokenizer=palette.tokenizer,
        max_length=min(args.max_length, limit),
    )
    print()
    print(format_markdown(rows))
    print()
    for key, name in REPORT_FILES.items():
        print(f"{'plot' if key == 'png' else key + ' table'}: {Path(args.out) / name}")
    if args.update_palette:
        # This evaluation replaces earlier metrics: mixing metrics from different data would mislead select_stitch.
        palette.config.stitch_metrics = {
            str(r["stitch"]): {"eval_loss": r["loss"], "eval_perplexity": r["perplexity"]} for r in rows
        }
        palette.config.save_pretrained(args.palette_dir)  # the weights are unchanged: rewrite config and card only
        write_model_card(palette, args.palette_dir)
        print(f"stitch metrics stored in {Path(args.palette_dir) / 'config.json'} (config.stitch_metrics)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------


def export(args: argparse.Namespace) -> int:
    """Save one stitch alone: only the weights it runs, as a plain anchor model or a slim palette."""
    budgets = _parse_budgets(args)
    best = str(args.stitch).strip().lower() == "best"
    if budgets and not best:
        raise CliError(
            f"budgets ({', '.join(o for o, k, _ in BUDGETS if k in budgets)}) apply only with --stitch best; "
            f"drop them or replace --stitch {args.stitch} with --stitch best"
        )
    if Path(args.out).resolve() == Path(args.palette_dir).resolve():
        raise CliError("--out is the palette folder itself: export to another folder")
    out = _check_out_dir(args.out, args.overwrite)
    # Profiling (for latency and memory budgets) measures the device the palette runs on.
    palette = _load_palette(args.palette_dir, device=args.device if best else None)
    if best:
        profiled = bool((palette.config.stitch_profile or {}).get("stitches"))
        if ("max_latency_ms" in budgets or "max_memory_mb" in budgets) and not profiled:
            print("measuring the latency and memory of every stitch on this machine (profile_stitches)...")
            palette.profile_stitches()
        k = palette.select_stitch(**budgets)
        ppl = (palette.config.stitch_metrics or {}).get(str(k), {}).get("eval_perplexity")
        within = ", ".join(f"{option} {budgets[key]}" for option, key, _ in BUDGETS if key in budgets)
        print(
            f"best stitch within {within or 'no budget'}: {_stitch_label(palette, k)}"
            + (f", eval perplexity {ppl:.4g}" if ppl is not None else "")
        )
    else:
        k = _stitch_index(palette, args.stitch)
    cost = palette.config.stitch_cost(k)
    cls = palette.export_stitch(k, out)
    export_bytes, palette_bytes = _safetensors_bytes(out), _safetensors_bytes(args.palette_dir)
    print(f"exported {_stitch_label(palette, k)} as {cls} to {out}")
    print(f"  {_human(cost.params)} parameters, {_human(cost.flops_per_token)} FLOPs/token")
    ratio = export_bytes / palette_bytes if palette_bytes else float("nan")
    print(
        f"size on disk (*.safetensors): export {_human_bytes(export_bytes)}, palette {_human_bytes(palette_bytes)} "
        f"(export = {ratio:.1%} of the palette)"
    )
    loader = "AutoModelForCausalLM.from_pretrained"
    remote = ", trust_remote_code=True" if cls.startswith("StitchedLlama") else ""
    print(f'load it with {loader}("{out}"{remote})')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------------------------

CHAT_HELP = "commands: /stitches (table), /stitch K (switch), /reset (forget the conversation), /quit; Ctrl-D ends"


def chat(args: argparse.Namespace) -> int:
    """Chat with any stitch of a palette on stdin; switch stitches live with /stitch K."""
    from transformers import TextStreamer

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise CliError(f"--temperature {args.temperature} must be 0 (greedy) or more")
    palette = _load_palette(
        args.palette_dir, tokenizer=args.tokenizer, need_tokenizer=True, dtype=args.dtype, device=args.device
    )
    tokenizer = palette.tokenizer
    stitch = palette.active_stitch if args.stitch is None else _stitch_index(palette, args.stitch)
    limit = _context_limit(palette)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {_stitch_label(palette, stitch)}; {CHAT_HELP}", flush=True)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/stitches":
                print(_stitch_table(palette, active=stitch))
            elif command == "/stitch":
                try:
                    stitch = _stitch_index(palette, argument.strip() or "?")
                    print(f"now chatting with {_stitch_label(palette, stitch)}")
                except CliError as error:
                    print(f"error: {error}")
            elif command == "/reset":
                history = []
                print("conversation cleared")
            else:
                print(f"unknown command {command!r}; {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": line})
        _, input_ids = _render_prompt(tokenizer, system + history)
        while input_ids.shape[1] + args.max_new_tokens > limit and len(history) > 1:
            history = history[2:]  # forget the oldest exchange to stay within the anchors' context
            _, input_ids = _render_prompt(tokenizer, system + history)
        if input_ids.shape[1] + 1 > limit:
            print(f"error: this message alone is {input_ids.shape[1]} tokens, over the context of {limit}")
            history.pop()
            continue
        max_new = min(args.max_new_tokens, limit - input_ids.shape[1])
        print(f"[stitch {stitch}] ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = _generate(palette, tokenizer, input_ids, stitch, max_new, args.temperature, streamer)
        history.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> int:
    """The whole job on the built-in model family, offline: search -> ESTA training -> evaluation -> generation."""
    import torch

    from .demo import run_demo

    for option, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value < 1:
            raise CliError(f"{option} {value} must be at least 1")
    if args.learning_rate <= 0:
        raise CliError(f"--learning-rate {args.learning_rate} must be positive")
    if not 0 <= args.distill_alpha <= 1:
        raise CliError(f"--distill-alpha {args.distill_alpha} must lie in [0, 1]")
    torch.set_num_threads(args.threads)
    run_demo(
        args.out,
        steps=args.steps,
        learning_rate=args.learning_rate,
        distill_alpha=args.distill_alpha,
        seed=args.seed,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stitched-llama")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="stitched-llama", description=__doc__, formatter_class=formatter, allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    parser.add_argument("--verbose", action="store_true", help="show the library's info logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.command_parsers = {}  # name -> its parser, for the usage line printed with a user error

    def command(name: str, func, description: str, **kwargs) -> argparse.ArgumentParser:
        p = commands.add_parser(
            name,
            help=func.__doc__.splitlines()[0],
            description=description,
            formatter_class=formatter,
            allow_abbrev=False,
            **kwargs,
        )
        p.set_defaults(func=func)
        parser.command_parsers[name] = p
        return p

    p = command(
        "build",
        build,
        "Build a palette between a small and a large anchor (local folders or Hub ids of llama/mistral/qwen2\n"
        "models sharing a tokenizer), fit its stitching layers by least squares on calibration text, print the\n"
        "stitch table and fit errors, and save it (weights, config, tokenizer from SMALL, model card).\n\n"
        "  stitched-llama build HuggingFaceTB/SmolLM2-135M-Instruct HuggingFaceTB/SmolLM2-360M-Instruct \\\n"
        "      --out smollm2-palette --calibration domain.txt train.jsonl",
    )
    p.add_argument("small", metavar="SMALL", help="small anchor: model folder or Hub id")
    p.add_argument("large", metavar="LARGE", help="large anchor: model folder or Hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the palette to")
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="FILE",
        help="calibration data for the least-squares fit: .txt (paragraphs) and/or .jsonl/.json/.parquet "
        "(instruction records, or records with a `text` field); default: random tokens (worse stitches)",
    )
    p.add_argument(
        "--calibration-records", type=int, default=256, metavar="N", help="use at most N texts/records (default 256)"
    )
    p.add_argument(
        "--stitches",
        metavar='"n,j;n,j"',
        help='explicit (n, j) stitches, e.g. "3,6;2,4" (n small layers, then large layers from j); the anchors '
        "are always added; default: SN-Net's rule, one hybrid per large-anchor cut",
    )
    p.add_argument(
        "--no-share-stitch-layers",
        action="store_true",
        help="one stitching layer per stitch instead of one per small-anchor cut n",
    )
    p.add_argument(
        "--no-map-first-token",
        action="store_true",
        help="let the first token pass through the stitching layer too, instead of the large anchor's mean state",
    )
    p.add_argument("--dtype", choices=DTYPES, help="dtype to load the anchors in (default: their saved dtype)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id; default: the one of SMALL")
    p.add_argument("--max-length", type=int, default=512, help="calibration sequences are cut to this many tokens")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge term of the fit, relative (default 1e-2)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    p.add_argument(
        "--search",
        type=int,
        metavar="K",
        help="search before training: measure every candidate stitch (SN-Net's, their neighbours and layer skips, or "
        "--stitches) on --search-data and keep the best of each of K FLOPs budgets",
    )
    p.add_argument("--search-data", metavar="FILE", help="held-out text or records the search measures on")
    p.add_argument(
        "--skip-blocks",
        default="1,2,4",
        metavar="SIZES",
        help="with --search: sizes of the large-anchor blocks to try skipping, chosen by angular distance "
        "(default 1,2,4; '' for none)",
    )

    # `train` takes every TrainingArguments flag: its real parser (HfArgumentParser) is built when it runs.
    command(
        "train",
        train,
        "Fine-tune with ESTA; see `stitched-llama train --help` for all flags.",
        add_help=False,
    )

    p = command(
        "evaluate",
        evaluate,
        "Evaluate stitches of a palette on held-out data: loss and perplexity next to parameters and FLOPs, the\n"
        "Pareto front, written to --out as evaluation.md/.csv/.json and pareto.png.\n\n"
        "  stitched-llama evaluate run/palette --data val.jsonl --out run/eval --update-palette",
    )
    p.add_argument("palette_dir", metavar="PALETTE_DIR", help="palette folder")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="instruction records (.jsonl/.json/.parquet, responses scored) or .txt (plain-text perplexity of "
        "every token, one paragraph per sequence)",
    )
    p.add_argument(
        "--stitches", default="all", help='stitches to evaluate: all (default), deployed, or indices like "0,3,5"'
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the tables and the plot")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=1024, help="longest sequence, in tokens (default 1024)")
    p.add_argument("--max-records", type=int, metavar="N", help="evaluate only the first N records")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id; default: the palette's")
    p.add_argument("--device", default="auto", help="where to run: auto (cuda if available, default), cpu, cuda:1...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the palette in (default: saved)")
    p.add_argument(
        "--update-palette",
        action="store_true",
        help="store the metrics in the palette's config (config.stitch_metrics, replacing earlier ones; "
        "`export --stitch best` then picks by eval loss) and rewrite its config and model card",
    )

    p = command(
        "export",
        export,
        "Export one stitch alone: only the weights it runs (LoRA merged, its biases folded in). An anchor\n"
        "becomes a plain Llama/Mistral/Qwen2 model, a hybrid a slim palette. --stitch best picks the best stitch\n"
        "within budgets (lowest eval loss when `evaluate --update-palette` stored metrics).\n\n"
        "  stitched-llama export run/palette --stitch 3 --out stitch3\n"
        "  stitched-llama export run/palette --stitch best --max-params 1.5B --max-latency-ms 20 --out slim",
    )
    p.add_argument("palette_dir", metavar="PALETTE_DIR", help="palette folder")
    p.add_argument(
        "--stitch",
        required=True,
        metavar="K",
        help="stitch index (0 = small anchor, -1 = large), small, large, or best",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the export to")
    p.add_argument("--max-params", metavar="N", help='parameter budget for best, e.g. "1.5B", "350M"')
    p.add_argument("--max-flops", metavar="N", help='forward FLOPs-per-token budget for best, e.g. "2G"')
    p.add_argument(
        "--max-latency-ms", metavar="T", help='per-token decode time budget for best, e.g. "20" or "20ms" (measured)'
    )
    p.add_argument("--max-memory-mb", metavar="M", help='memory budget for best, e.g. "800" or "2GB" (measured)')
    p.add_argument(
        "--device", default="auto", help="device that latency/memory budgets are measured on (default: auto)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")

    p = command(
        "chat",
        chat,
        "Chat with a stitch of a palette, one message per line on stdin, replies streamed as they are generated.\n"
        "The conversation is kept (the oldest turns are dropped when it outgrows the context).\n"
        "In the chat: /stitches prints the stitch table (> marks the active stitch), /stitch K switches stitch,\n"
        "/reset forgets the conversation, /quit (or Ctrl-D) ends.",
    )
    p.add_argument("palette_dir", metavar="PALETTE_DIR", help="palette folder (with its tokenizer)")
    p.add_argument("--stitch", metavar="K", help="stitch to start with; default: the palette's active stitch")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens (default 256)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id; default: the palette's")
    p.add_argument("--device", default="auto", help="where to run: auto (cuda if available, default), cpu, cuda:1...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the palette in (default: saved)")

    p = command(
        "demo",
        demo,
        "Run the whole job offline on the built-in default in a few minutes on a CPU: the built-in family of two\n"
        "small LLaMA models pretrained alike on Python docs, Shakespeare and WordNet (stitched_llama/assets/family)\n"
        "-> search the stitch space (hybrids and layer skips) -> ESTA with distillation on text -> every stitch on\n"
        "held-out Python docs (table + Pareto plot) -> greedy continuations. Everything is saved under --out.",
    )
    p.add_argument("--out", default=os.path.join("outputs", "demo"), metavar="DIR", help="default ./outputs/demo")
    p.add_argument("--steps", type=int, default=400, help="ESTA training steps (default 400)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="ESTA peak learning rate (default 2e-3)")
    p.add_argument(
        "--distill-alpha", type=float, default=0.5, help="weight of distillation from the large anchor (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of training")
    p.add_argument("--prompt", default="The module provides", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest continuation, in tokens (default 24)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # `train` gets its own parser (all TrainingArguments flags): hand it everything after the command name.
    position = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if position is not None and argv[position] == "train":
        args = parser.parse_args(argv[: position + 1])
        args.train_argv = argv[position + 1 :]
    else:
        args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Raised by transformers' own Trainer/peft calls, not by anything the user can change.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    if args.verbose:
        hf_logging.set_verbosity_info()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as error:
        if args.debug:
            raise
        # As argparse reports its own errors: the command's usage, then one line saying what is wrong.
        usage = _train_parser() if args.command == "train" else parser.command_parsers[args.command]
        print(usage.format_usage().rstrip(), file=sys.stderr)
        print(f"stitched-llama {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

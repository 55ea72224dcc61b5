"""Evaluate every stitch of a palette on held-out data and tell which ones are worth their cost.

    from stitched_llama.evaluation import evaluate_palette, pareto_front, write_report

    rows = evaluate_palette(model, eval_dataset)            # one dict per stitch, cheapest first
    pareto_front(rows)                                      # stitches no other beats on both FLOPs and perplexity
    paths = write_report(rows, "eval-out")                  # evaluation.md / .csv / .json and pareto.png
    rows = evaluate_palette(model, eval_dataset, stitches="deployed", output_dir="eval-out")  # both at once

`model` is a palette or the peft model `prepare_esta` / `load_esta_adapter` returns (the forward runs through it,
so LoRA is applied). `eval_dataset` is what `data.tokenize_instructions` returns (`input_ids`, `attention_mask`,
`labels`); without `labels` every token is scored, and a list of strings with `tokenizer=` gives plain-text
perplexity.

The loss of a stitch is exact over the whole dataset: the summed negative log-likelihood of every label token
divided by the number of label tokens (not a mean of per-batch means, which would overweight short batches).
Each row holds:

    stitch, n, j, kind, layers, params, flops_per_token   as in `palette.stitch_table()`
    deployed                                              whether the stitch is in `config.deployed_stitches`
    loss, perplexity, tokens                              mean NLL per label token, exp(loss), label tokens scored

The rows are plain JSON-ready dicts, so `write_report` also accepts rows read back from `evaluation.json`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .esta import unwrap_palette

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # the label value transformers' causal-LM losses skip
REPORT_FILES = {"md": "evaluation.md", "csv": "evaluation.csv", "json": "evaluation.json", "png": "pareto.png"}
_MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
_CSV_FIELDS = (
    "stitch",
    "n",
    "j",
    "skip",
    "kind",
    "layers",
    "params",
    "flops_per_token",
    "deployed",
    "pareto",
    "loss",
    "perplexity",
    "tokens",
)

Rows = list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def evaluate_palette(
    model: nn.Module,
    dataset: Any,
    stitches: Sequence[int] | Literal["all", "deployed"] = "all",
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    collator: Callable[[list[dict[str, Any]]], Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> Rows:
    """Loss and perplexity of each stitch on `dataset`, next to its cost.

    Args:
        model: a `StitchedLlamaForCausalLM`, or a peft model around one (LoRA is applied).
        dataset: a tokenized `datasets.Dataset` (or list of dicts) with `input_ids` and optionally
            `attention_mask` and `labels` (-100 = not scored; without `labels` every non-padding token is scored),
            or a list of strings, tokenized with `tokenizer`.
        stitches: `"all"`, `"deployed"` (`config.deployed_stitches`, chosen by training) or a list of indices
            (negative ones count from the end). Rows come back sorted by stitch index, i.e. by cost.
        batch_size: examples per forward pass.
        output_dir: if given, also write the report there (see `write_report`).
        collator: turns a list of examples (only their `input_ids`/`attention_mask`/`labels`) into a batch of
            tensors, e.g. `data.collate_fn(tokenizer)`. Defaults to right padding with mask 0 and labels -100.
        progress: show a progress bar (`transformers.utils.logging.tqdm`).
        tokenizer: for a list of strings; defaults to the tokenizer `from_anchors` attached to the palette.
        max_length: for a list of strings, truncate each text to this many tokens.

    Returns:
        One dict per evaluated stitch (keys in the module docstring).

    The model is run in `torch.inference_mode()` and `eval()` mode; every module's train/eval mode is restored
    afterwards. The palette's active stitch is not changed.
    """
    palette = unwrap_palette(model)
    indices = _resolve_stitches(palette, stitches)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if tokenizer is None:
        tokenizer = getattr(palette, "tokenizer", None)
    batches = _batches(dataset, batch_size, collator, tokenizer, max_length)
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    if n_tokens == 0:
        raise ValueError(
            "The dataset has no label token to score: every label is -100 (or every sequence has a single token). "
            "Pass data with `labels` on the tokens to evaluate, or drop `labels` to score every token."
        )

    table = {row["stitch"]: row for row in palette.stitch_table()}
    deployed = set(palette.config.deployed_stitches or [])
    device = palette.device
    modes = {module: module.training for module in model.modules()}
    bar = logging.tqdm(total=len(indices) * len(batches), desc="Evaluating stitches", disable=not progress)
    rows = []
    try:
        model.eval()
        with torch.inference_mode():
            for k in indices:
                bar.set_postfix_str(f"stitch {k}")
                total_nll = 0.0  # a Python float (double) so that many batches add up exactly enough
                for batch in batches:
                    total_nll += _batch_nll(model, batch, k, device)
                    bar.update(1)
                loss = total_nll / n_tokens
                rows.append(
                    {
                        **table[k],
                        "deployed": k in deployed,
                        "loss": loss,
                        "perplexity": math.exp(loss) if loss < 700 else math.inf,
                        "tokens": n_tokens,
                    }
                )
    finally:
        bar.close()
        for module, training in modes.items():
            module.training = training

    if output_dir is not None:
        paths = write_report(rows, output_dir)
        logger.info(f"Palette evaluation written to {', '.join(paths.values())}")
    return rows


def _resolve_stitches(palette: nn.Module, stitches: Sequence[int] | str) -> list[int]:
    config = palette.config
    if isinstance(stitches, str):
        if stitches == "all":
            return list(range(palette.num_stitches))
        if stitches == "deployed":
            if not config.deployed_stitches:
                raise ValueError(
                    "stitches='deployed' but this palette has no deployed stitches yet "
                    "(`config.deployed_stitches` is empty): train it with `StitchTrainer`, which chooses them, "
                    "or evaluate stitches='all'."
                )
            return sorted(set(config.deployed_stitches))
        raise ValueError(f"Unknown stitches={stitches!r}: pass 'all', 'deployed' or a list of stitch indices.")
    indices = sorted({config.resolve_stitch(k) for k in stitches})
    if not indices:
        raise ValueError("`stitches` is an empty list: pass at least one stitch index, or 'all'.")
    return indices


def _batches(
    dataset: Any,
    batch_size: int,
    collator: Callable | None,
    tokenizer: PreTrainedTokenizerBase | None,
    max_length: int | None,
) -> list[dict[str, torch.Tensor]]:
    """Collate the whole dataset once (on CPU): every stitch then runs on the same batches."""
    examples = _examples(dataset, tokenizer, max_length)
    collate = collator or _pad_collate
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = dict(collate(examples[start : start + batch_size]))
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = batch["attention_mask"] = torch.ones_like(input_ids)
        if batch.get("labels") is None:  # score every real token
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batches.append({key: batch[key] for key in _MODEL_COLUMNS})
    return batches


def _examples(dataset: Any, tokenizer: PreTrainedTokenizerBase | None, max_length: int | None) -> list[dict]:
    """The dataset as a list of dicts holding only the model's columns."""
    if isinstance(dataset, str) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"`dataset` must be a datasets.Dataset, a list of tokenized examples or a list of strings, "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError("The evaluation dataset is empty: pass at least one example.")
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        if "input_ids" not in column_names:
            raise ValueError(
                f"The dataset has columns {column_names} but no `input_ids`: tokenize it first "
                "(`data.tokenize_instructions`), or pass a list of strings with `tokenizer=`."
            )
        columns = dataset.select_columns([c for c in _MODEL_COLUMNS if c in column_names])[:]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    first = dataset[0]
    if isinstance(first, str):
        if tokenizer is None:
            raise ValueError(
                "The dataset is a list of strings but no tokenizer is known: pass `tokenizer=` (the anchors' "
                "tokenizer), or tokenize the texts yourself."
            )
        encoded = tokenizer(list(dataset), truncation=max_length is not None, max_length=max_length)
        return [{"input_ids": ids} for ids in encoded["input_ids"]]
    if isinstance(first, Mapping):
        if "input_ids" not in first:
            raise ValueError(f"Example 0 has keys {sorted(first)} but no `input_ids`: tokenize the data first.")
        return [{c: example[c] for c in _MODEL_COLUMNS if c in example} for example in dataset]
    raise TypeError(
        f"Examples of type {type(first).__name__} are not understood: pass tokenized examples (dicts with "
        "`input_ids`) or strings with `tokenizer=`."
    )


def _pad_collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad on the right: `input_ids` with 0 (hidden by the mask, never scored), mask 0, labels -100."""

    def as_list(x: Any) -> list[int]:
        return x.tolist() if isinstance(x, torch.Tensor) else list(x)

    ids = [as_list(e["input_ids"]) for e in examples]
    width = max(len(x) for x in ids)
    batch = {
        "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor(
            [
                (as_list(e["attention_mask"]) if "attention_mask" in e else [1] * len(x)) + [0] * (width - len(x))
                for e, x in zip(examples, ids)
            ]
        ),
    }
    if all("labels" in e for e in examples):
        labels = [as_list(e["labels"]) for e in examples]
        batch["labels"] = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels])
    return batch


def _batch_nll(model: nn.Module, batch: dict[str, torch.Tensor], stitch: int, device: torch.device) -> float:
    """Summed NLL of the batch's label tokens (label at t is predicted from the logits at t - 1)."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, stitch=stitch, use_cache=False).logits
    labels = batch["labels"][:, 1:].to(logits.device)
    scored = labels != IGNORE_INDEX
    # Upcast only the scored positions: float logits of a whole batch over a large vocabulary are big.
    nll = F.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="sum")
    return float(nll)


# ----------------------------------------------------------------------------------------------------------------
# Pareto front
# ----------------------------------------------------------------------------------------------------------------


def pareto_front(
    rows: Sequence[Mapping[str, Any]], cost_key: str = "flops_per_token", metric_key: str = "perplexity"
) -> list[int]:
    """Stitches that no other stitch beats on both cost and metric (lower is better for both), sorted by cost.

    A stitch is dominated when another one costs no more and scores no worse, and is strictly better on at least
    one of the two; equal rows do not dominate each other. Rows with a NaN cost or metric are left out. Returns
    the rows' `stitch` values (a row's position in `rows` where it has none).
    """
    points = []
    for position, row in enumerate(rows):
        for key in (cost_key, metric_key):
            if key not in row:
                raise KeyError(
                    f"Row {position} has no {key!r} (it has {sorted(row)}): pass cost_key= / metric_key= naming "
                    "columns of the rows."
                )
        cost, metric = float(row[cost_key]), float(row[metric_key])
        if not (math.isnan(cost) or math.isnan(metric)):
            points.append((cost, metric, row.get("stitch", position)))
    front = [
        p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points)
    ]
    return [stitch for _, _, stitch in sorted(front)]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def write_report(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict[str, str]:
    """Write the evaluation as `evaluation.md` (markdown table), `evaluation.csv`, `evaluation.json` and
    `pareto.png` (see `plot_pareto`) into `output_dir`, created if needed.

    Every row gains a `pareto` flag (on the FLOPs / perplexity front of the rows given). The JSON file holds
    `{"stitches": rows, "pareto_front": [...], "deployed_stitches": [...]}`.

    Returns:
        The paths written, keyed `md`, `csv`, `json` and `png`.
    """
    if not rows:
        raise ValueError("No rows to report: evaluate at least one stitch first.")
    os.makedirs(output_dir, exist_ok=True)
    paths = {key: os.path.join(output_dir, name) for key, name in REPORT_FILES.items()}
    front = pareto_front(rows)
    rows = [{**row, "pareto": row["stitch"] in front} for row in rows]

    with open(paths["md"], "w") as f:
        f.write(format_markdown(rows) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        fields = [k for k in _CSV_FIELDS if k in rows[0]] + [k for k in rows[0] if k not in _CSV_FIELDS]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w") as f:
        report = {
            "stitches": rows,
            "pareto_front": front,
            "deployed_stitches": [row["stitch"] for row in rows if row.get("deployed")],
        }
        json.dump(report, f, indent=2)
    plot_pareto(rows, paths["png"])
    return paths


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table; the `pareto` column is computed when the rows do not carry it."""
    front = set(pareto_front(rows))
    lines = [
        "| stitch | (n, j) | kind | layers | params | FLOPs/token | loss | perplexity | tokens | deployed | Pareto |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for r in rows:
        pareto = r.get("pareto", r["stitch"] in front)
        lines.append(
            f"| {r['stitch']} | {r['name']} | {r['kind']} | {r['layers']} | {_human(r['params'])} | "
            f"{_human(r['flops_per_token'])} | {r['loss']:.4f} | {r['perplexity']:.4g} | {r['tokens']} | "
            f"{'yes' if r.get('deployed') else ''} | {'yes' if pareto else ''} |"
        )
    return "\n".join(lines)


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Scatter perplexity against forward FLOPs per token, with the Pareto front as a step line.

    Anchors are stars, hybrids circles, deployed stitches ringed, each point labelled with its stitch index. The
    y axis is logarithmic when perplexities span more than a factor 10. Drawn with the Agg canvas, so no display
    is needed and the pyplot backend of the caller is left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as error:
        raise ImportError("Plotting the evaluation needs matplotlib: `pip install matplotlib`.") from error

    shown = [r for r in rows if math.isfinite(r["perplexity"])]
    if len(shown) < len(rows):
        hidden = [r["stitch"] for r in rows if not math.isfinite(r["perplexity"])]
        logger.warning(f"Stitches {hidden} have a non-finite perplexity and are left out of the plot.")
    top = max((r["flops_per_token"] for r in rows), default=1)
    unit, scale = next(((u, s) for u, s in (("G", 1e9), ("M", 1e6), ("K", 1e3)) if top >= s), ("", 1))

    def x(r: Mapping[str, Any]) -> float:
        return r["flops_per_token"] / scale

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ppl = [r["perplexity"] for r in shown]
    if ppl and max(ppl) / min(ppl) > 10:
        ax.set_yscale("log")
        # Plain numbers at 1-2-5 steps: bare powers of ten leave too few labels to read a perplexity off.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    by_stitch = {r["stitch"]: r for r in shown}
    front = [by_stitch[k] for k in pareto_front(shown)]
    if front:
        ax.step(
            [x(r) for r in front],
            [r["perplexity"] for r in front],
            where="post",
            color="tab:green",
            linewidth=1.5,
            alpha=0.8,
            zorder=1,
            label="Pareto front",
        )
    styles = {
        "hybrid": dict(marker="o", s=40, color="tab:blue"),
        "small anchor": dict(marker="*", s=220, color="tab:orange"),
        "large anchor": dict(marker="*", s=220, color="tab:red"),
    }
    for kind, style in styles.items():
        group = [r for r in shown if r["kind"] == kind]
        if group:
            label = "hybrid stitch" if kind == "hybrid" else kind
            ax.scatter(
                [x(r) for r in group],
                [r["perplexity"] for r in group],
                label=label,
                zorder=3,
                edgecolors="black",
                linewidths=0.5,
                **style,
            )
    deployed = [r for r in shown if r.get("deployed")]
    if deployed:
        ax.scatter(
            [x(r) for r in deployed],
            [r["perplexity"] for r in deployed],
            marker="o",
            s=330,
            facecolors="none",
            edgecolors="tab:purple",
            linewidths=1.8,
            zorder=2,
            label="deployed",
        )
    for r in shown:
        ax.annotate(
            str(r["stitch"]), (x(r), r["perplexity"]), xytext=(7, 7), textcoords="offset points", fontsize=8, zorder=4
        )

    ax.set_xlabel(f"forward {unit}FLOPs per token")
    ax.set_ylabel("perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    tokens = shown[0]["tokens"] if shown and "tokens" in shown[0] else None
    ax.set_title("Stitch palette: perplexity vs cost" + (f" ({tokens:,} label tokens)" if tokens else ""))
    ax.grid(True, which="major", alpha=0.3)
    legend = ax.legend(loc="best", fontsize=9)
    for handle in legend.legend_handles:  # the legend's own copies: fixed sizes so stars do not dwarf the text
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([90])
    fig.savefig(path, dpi=120)


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(int(x))


__all__ = ["evaluate_palette", "format_markdown", "pareto_front", "plot_pareto", "write_report"]

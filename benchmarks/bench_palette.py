"""Every method on one anchor pair, with the same data and the same budget: the small pretrained family
(`pretrain_family.py`, the default) or the real Qwen2.5-Coder 0.5B/1.5B pair (`prepare_anchors.py`).

    python benchmarks/bench_palette.py --out docs/results/family --seeds 0 1 2 --steps 250
    python benchmarks/bench_palette.py --pair qwen --out docs/results/qwen --methods esta-distill lora-per-stitch

1. **Search.** Fit every candidate stitch (SN-Net's, their neighbours, and the large anchor with the block of 1, 2
   or 3 layers that changes its state least, alone and after a stitch), measure held-out loss on a validation
   slice, and keep the best stitch per FLOPs budget (`stitched_llama.search.search_palette`).
2. **Train** that palette, from the same least-squares start, with each method for `--steps` optimizer steps of
   the same text batches (healing on generic text, every token scored):
   - `esta-importance`: shared LoRA + stitch biases, SNIP importance sampling (the paper);
   - `esta-uniform`: the same, uniform sampling;
   - `esta-loss-gap`: the same, sampling by how far a stitch's running loss lies above the cheaper stitches';
   - `esta-distill`: uniform sampling, loss mixed with distillation from the frozen large anchor;
   - `esta-distill-stitch`: the same, the stitching layers' own weights trained instead of a LoRA on them;
   - `snnet-full`: SN-Net direct adaptation (every anchor weight trained, uniform);
   - `lora-per-stitch`: one LoRA per stitch, each given the whole step budget (the upper reference, and the
     "tune each size separately" baseline: it includes the anchors and the layer-dropped large anchor).
3. **Evaluate** every stitch on the held-out Python docs (test slice, never seen by the search), and on
   held-out Shakespeare (family) or the answers of WordNet test records (Qwen). The search's validation slice is
   measured too (`validation_loss`), so that settings can be compared without looking at the test.

`--pair` sets the defaults of the other options for that pair (the Qwen ones fit a CPU run of about 90 minutes);
any option given on the command line wins. `--eval-every N` also measures every stitch every N steps of each run
(quality against training tokens), and `--per-stitch-kinds` limits the per-stitch LoRA to some kinds of stitch, or
to named ones. `--stitches` trains a palette given by hand instead of the search's (e.g. the large anchor with
more layers dropped than the search considers, as a baseline), and `--train-stitches` makes the palette methods train
only some of its stitches (e.g. `hybrid`: the others are measured, not sampled).

Results go to `<out>/results.json` after every run, so a stopped run keeps what it finished; `--report` writes
`<out>/report.md` (means and spread over seeds) from them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset

from stitched_llama.data import tokenize_texts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import QWEN_LARGE_DIR, QWEN_SMALL_DIR, TEXT_DIR, WORDNET_DIR, resolve_cache_dir  # noqa: E402

FAMILY = ROOT / "stitched_llama/assets/family"
PAIRS = {  # --pair -> defaults of the other options
    "family": dict(
        small=str(FAMILY / "small"),
        large=str(FAMILY / "large"),
        out=str(ROOT / "docs/results/family"),
        steps=300,
        batch_size=8,
        learning_rate=2e-3,
        skip_sizes=[1, 2, 3],
        every=1,
        spread=1,
        budgets=6,
        calibration_rows=64,
        validation_rows=24,
        test_rows=48,
        second_test="shakespeare",
    ),
    "qwen": dict(
        small=QWEN_SMALL_DIR,
        large=QWEN_LARGE_DIR,
        out=str(ROOT / "docs/results/qwen"),
        steps=200,
        batch_size=2,
        learning_rate=5e-4,
        skip_sizes=[2, 4, 6, 10],
        every=3,
        spread=0,
        budgets=5,
        calibration_rows=32,
        validation_rows=2,
        test_rows=8,
        second_test="wordnet",
    ),
}

DISTILL = dict(distill_alpha=0.5, distill_temperature=1.0)
LOSS_GAP = dict(method="esta", sampling="loss-gap")
FRONTIER = LOSS_GAP | dict(loss_gap_keep_frontier=True)
METHODS = {  # name -> StitchTrainingArguments overrides
    "esta-importance": dict(method="esta", sampling="importance"),
    "esta-uniform": dict(method="esta", sampling="uniform"),
    "esta-loss-gap": LOSS_GAP,
    "esta-distill": dict(method="esta", sampling="uniform") | DISTILL,
    "esta-distill-stitch": dict(method="esta", sampling="uniform", train_stitch_layers=True) | DISTILL,
    "esta-loss-gap-distill": LOSS_GAP | DISTILL,
    "esta-frontier": FRONTIER,
    "esta-frontier-distill": FRONTIER | DISTILL,
    "esta-frontier-ref-distill": FRONTIER | DISTILL | dict(loss_gap_reference="teacher"),
    "snnet-full": dict(method="snnet-full", sampling="uniform"),
}
PER_STITCH = "lora-per-stitch"


def log(msg: str) -> None:
    print(f"[bench_palette {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def blocks(tokenizer, path: Path, block: int, start: int, count: int) -> Dataset:
    """Rows `start .. start + count - 1` of a text file cut into `block`-token rows."""
    text = path.read_text(encoding="utf-8")
    return tokenize_texts([text], tokenizer, block_size=block, drop_last=True).select(range(start, start + count))


def load_data(cache: Path, tokenizer, args) -> dict:
    text = cache / TEXT_DIR
    train_texts = []
    for name in ("python_docs_calib.txt", "shakespeare_train.txt"):
        train_texts += text.joinpath(name).read_text(encoding="utf-8")[: args.train_chars].split("\n\n\n")
    train = tokenize_texts(train_texts, tokenizer, block_size=args.block, drop_last=True).shuffle(seed=0)
    pydoc = text / "python_docs_heldout.txt"
    if args.second_test == "shakespeare":
        second = blocks(tokenizer, text / "shakespeare_heldout.txt", args.block, 0, args.test_rows)
    else:  # the answers of the first WordNet test records, in the tokenizer's chat format
        from stitched_llama.data import load_instruction_dataset, tokenize_instructions

        records = load_instruction_dataset(str(cache / WORDNET_DIR / "test.jsonl"))
        second = tokenize_instructions(records.select(range(args.wordnet_rows)), tokenizer)
    return {
        "train": train,
        "calibration": train.select(range(args.calibration_rows)),
        "validation": blocks(tokenizer, pydoc, args.block, args.test_rows, args.validation_rows).to_list(),
        "test_pydoc": blocks(tokenizer, pydoc, args.block, 0, args.test_rows),
        "test_second": second,
    }


def evaluate(model, data: dict, args, stitches: list[int] | str = "all") -> list[dict]:
    from stitched_llama.evaluation import evaluate_palette

    kwargs = dict(stitches=stitches, batch_size=args.eval_batch_size, progress=False)
    rows = evaluate_palette(model, data["test_pydoc"], **kwargs)
    second = evaluate_palette(model, data["test_second"], **kwargs)
    # The search's validation slice too, so that a setting (e.g. --stitch-weights) can be chosen without the test.
    validation = evaluate_palette(model, data["validation"], **kwargs)
    keep = ("stitch", "name", "kind", "flops_per_token", "params", "loss", "perplexity")
    return [
        {**{k: r[k] for k in keep}, f"{args.second_test}_loss": s["loss"], "validation_loss": v["loss"]}
        for r, s, v in zip(rows, second, validation)
    ]


def training_args(out: Path, seed: int, steps: int, args, **overrides):
    from stitched_llama.demo import healing_arguments

    learning_rate = overrides.pop("learning_rate", args.learning_rate)
    lora = dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    return healing_arguments(out, steps, learning_rate, seed, args.batch_size, **lora, **overrides)


def fresh_palette(args):
    """The searched palette, reloaded from the folder `search` saved it to, so that runs share nothing."""
    from stitched_llama import StitchedLlamaForCausalLM

    return StitchedLlamaForCausalLM.from_pretrained(args.work / "searched", dtype=torch.float32).eval()


class EvalEvery:
    """A `TrainerCallback` factory: every stitch measured every `every` steps of a run (quality against tokens)."""

    @staticmethod
    def callback(label: str, every: int, data: dict, args, points: list):
        from transformers import TrainerCallback

        class Curve(TrainerCallback):
            def on_step_end(self, targs, state, control, model=None, **kwargs):
                if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                    rows = evaluate(model, data, args)
                    tokens = state.global_step * args.batch_size * args.block
                    points.append({"step": state.global_step, "tokens": tokens, "stitches": rows})
                    ppl = ", ".join(f"{r['name']}: {r['perplexity']:.2f}" for r in rows)
                    log(f"{label} step {state.global_step}: {ppl}")

        return Curve()


def train_and_evaluate(
    label: str, seed: int, steps: int, data: dict, args, every: int = 0, stitches: list[int] | str = "all", **overrides
):
    """One training run of the searched palette; returns (rows after training, curve points before the end)."""
    from stitched_llama.workflow import train_palette

    torch.manual_seed(seed)
    points: list[dict] = []
    targs = training_args(args.work / "trainer", seed, steps, args, **overrides)
    callbacks = [EvalEvery.callback(label, every, data, args, points)]
    result = train_palette(fresh_palette(args), targs, data["train"], callbacks=callbacks, save=False)
    rows = evaluate(result.palette, data, args, stitches)
    if args.keep_trained and stitches == "all":  # e.g. for bench_speculative.py to draft with a trained hybrid
        folder = args.work / "trained" / label.replace(" ", "-")
        result.palette.save_pretrained(folder)
        log(f"{label}: trained palette saved to {folder}")
    for row in rows:
        row["visits"] = result.trainer.sampler.counts[row["stitch"]]
    return rows, points


def picked(row: dict, wanted: list[str]) -> bool:
    """Whether a stitch's row matches one of `wanted` kinds or names (all rows for an empty list)."""
    return not wanted or bool({row["kind"], row["name"]} & set(wanted))


def run_method(name: str, seed: int, data: dict, args, skip: set[int] = frozenset()) -> dict:
    t0 = time.perf_counter()
    points: list[dict] = []
    if name == PER_STITCH:  # each chosen stitch alone, with the whole step budget of a palette run
        rows = []
        for row in data["untuned"]:
            if not picked(row, args.per_stitch_kinds) or row["stitch"] in skip:
                continue
            k = row["stitch"]
            overrides = dict(METHODS[args.per_stitch_as], train_stitches=str(k))
            label = f"{name} {row['name']}"
            rows += train_and_evaluate(label, seed, args.steps, data, args, stitches=[k], **overrides)[0]
            log(f"{name} seed {seed}: stitch {k} {rows[-1]['name']} loss {rows[-1]['loss']:.4f}")
    else:
        overrides = dict(METHODS[name])
        if name == "snnet-full":
            overrides["learning_rate"] = args.full_learning_rate
        if args.train_stitches:
            chosen = [str(row["stitch"]) for row in data["untuned"] if picked(row, args.train_stitches)]
            if not chosen:
                names = ", ".join(f"{row['name']} ({row['kind']})" for row in data["untuned"])
                raise SystemExit(f"--train-stitches {args.train_stitches} matches no stitch of this palette: {names}")
            overrides["train_stitches"] = ",".join(chosen)
        if args.stitch_weights:
            if len(args.stitch_weights) != len(chosen if args.train_stitches else data["untuned"]):
                raise SystemExit(
                    f"--stitch-weights {args.stitch_weights}: give one share per stitch trained, in palette order"
                )
            overrides["stitch_weights"] = ",".join(map(str, args.stitch_weights))
        rows, points = train_and_evaluate(
            f"{name} seed {seed}", seed, args.steps, data, args, args.eval_every, **overrides
        )
    result = {"method": name, "seed": seed, "seconds": round(time.perf_counter() - t0), "stitches": rows}
    return result | ({"points": points} if points else {})


def run_curve(name: str, seed: int, data: dict, args) -> dict:
    """One long run of `name`, evaluating every stitch every `--curve-every` steps: quality against tokens."""
    rows, points = train_and_evaluate(
        f"curve {name}", seed, args.curve_steps, data, args, args.curve_every, **METHODS[name]
    )
    points.append(
        {"step": args.curve_steps, "tokens": args.curve_steps * args.batch_size * args.block, "stitches": rows}
    )
    return {"method": name, "seed": seed, "points": points}


def search(data: dict, args) -> dict:
    """Fit the candidates, keep the best per budget, and save that palette for every run to reload."""
    from transformers import AutoModelForCausalLM

    from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM
    from stitched_llama.evaluation import evaluate_palette
    from stitched_llama.search import candidate_stitches, format_search_table, layer_skip_blocks, search_palette

    small = AutoModelForCausalLM.from_pretrained(args.small, dtype=torch.float32).eval()
    large = AutoModelForCausalLM.from_pretrained(args.large, dtype=torch.float32).eval()
    calibration = data["calibration"]
    if args.stitches:  # a palette given by hand: no blocks to measure, no candidates to choose from
        blocks_, candidates = [], args.stitches
    else:
        blocks_ = layer_skip_blocks(large, calibration, block_sizes=args.skip_sizes, batch_size=args.eval_batch_size)
        config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
        candidates = candidate_stitches(config, blocks_, spread=args.spread, every=args.every)
    log(f"search: skip blocks {blocks_}, {len(candidates)} candidates")
    t0 = time.perf_counter()
    evaluate_kwargs = {"progress": False, "batch_size": args.eval_batch_size}
    if args.stitches:  # a palette given by hand: fitted and measured like the search's, every stitch kept
        palette = StitchedLlamaForCausalLM.from_anchors(
            small, large, stitches=args.stitches, calibration=calibration, share_stitch_layers=False
        )
        rows = [row | {"kept": True} for row in evaluate_palette(palette, data["validation"], **evaluate_kwargs)]
    else:
        palette, rows = search_palette(
            small, large, candidates, calibration, data["validation"], args.budgets, evaluate_kwargs=evaluate_kwargs
        )
    log(f"search: {len(candidates)} candidates in {time.perf_counter() - t0:.0f} s\n{format_search_table(rows)}")
    palette.save_pretrained(args.work / "searched")
    return {
        "blocks": blocks_,
        "stitches": [list(s) for s in palette.config.stitches],
        "table": [{k: r[k] for k in ("name", "kind", "flops_per_token", "loss", "kept")} for r in rows],
        "seconds": round(time.perf_counter() - t0),
    }


def report(out: Path) -> None:
    """`<out>/report.md`: per stitch and method, the mean and spread over seeds of each test measure."""
    results = json.loads((out / "results.json").read_text())
    runs, untuned, settings = results["runs"], results["untuned"], results["settings"]
    methods = ["untuned", *dict.fromkeys(r["method"] for r in runs)]
    second = f"{settings.get('second_test', 'shakespeare')}_loss"
    lines = [
        f"# Palette comparison: {settings.get('small', 'small')} / {settings.get('large', 'large')}",
        "",
        f"Machine: {results['machine']}. Settings (of the latest call): {json.dumps(settings)}.",
    ]
    machines = {
        run["method"]: run["machine"] for run in runs if run.get("machine", results["machine"]) != results["machine"]
    }
    lines += [f"- {method} ran on: {machine}." for method, machine in machines.items()]
    measures = [("perplexity", "Held-out Python-docs perplexity"), (second, f"Test {second.replace('_', ' ')}")]
    if any("validation_loss" in r for run in runs for r in run["stitches"]):
        measures.append(("validation_loss", "Validation Python-docs loss (the search's slice, for choosing settings)"))
    for key, title in measures:
        lines += [
            "",
            f"{title} per stitch (mean ± standard deviation over seeds; n = seeds run).",
            "",
            "| stitch | kind | MFLOPs/token | " + " | ".join(methods) + " |",
            "|---|---|---:|" + "---:|" * len(methods),
        ]
        for row in untuned:
            cells = []
            for method in methods:
                found = (
                    [row]
                    if method == "untuned"
                    else [
                        r
                        for run in runs
                        if run["method"] == method
                        for r in run["stitches"]
                        if r["stitch"] == row["stitch"]
                    ]
                )
                values = [r[key] for r in found if key in r]
                if not values:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.2f} (n=1)" if method != "untuned" else f"{values[0]:.2f}")
                else:
                    cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})")
            lines.append(
                f"| {row['name']} | {row['kind']} | {row['flops_per_token'] / 1e6:.2f} | " + " | ".join(cells) + " |"
            )
    if any(run.get("points") for run in runs):
        plot_tokens(results, out / "tokens.png")
        lines += ["", "![Held-out perplexity against training tokens](tokens.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def curve_report(out: Path) -> None:
    """`<out>/curve.md` from `curve.json`: held-out perplexity per method, step and stitch, mean ± standard deviation
    over the seeds run."""
    curve = json.loads((out / "curve.json").read_text())
    names = [r["name"] for r in curve["runs"][0]["points"][0]["stitches"]]
    lines = [
        f"# Quality against training tokens (seeds {sorted({r['seed'] for r in curve['runs']})})",
        "",
        "Held-out Python-docs perplexity, mean ± standard deviation over seeds (n = seeds).",
        "",
        "| method | step | tokens | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for method in dict.fromkeys(r["method"] for r in curve["runs"]):
        runs = [r for r in curve["runs"] if r["method"] == method]
        for i, point in enumerate(runs[0]["points"]):
            cells = []
            for j in range(len(names)):
                values = [r["points"][i]["stitches"][j]["perplexity"] for r in runs if len(r["points"]) > i]
                spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.2f}{spread} (n={len(values)})")
            lines.append(f"| {method} | {point['step']} | {point['tokens'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_tokens(results: dict, path: Path) -> None:
    """Held-out perplexity of every stitch against training tokens, for the runs evaluated as they went (untuned at
    0 tokens); a stitch tuned alone with the same budget is a marker at the end of the curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tokens = results["settings"]["tokens_per_run"]
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # One colour per stitch, one line style per method.
    colours = {row["stitch"]: f"C{i}" for i, row in enumerate(results["untuned"])}
    curves = [run for run in results["runs"] if run.get("points")]
    for run, style in zip(curves, ("-", "--", ":", "-.")):
        for row in results["untuned"]:
            k = row["stitch"]
            curve = [(0, row["perplexity"])]
            curve += [(p["tokens"], r["perplexity"]) for p in run["points"] for r in p["stitches"] if r["stitch"] == k]
            curve += [(tokens, r["perplexity"]) for r in run["stitches"] if r["stitch"] == k]
            label = f"{row['name']} {row['kind']}, {row['flops_per_token'] / 1e9:.2f} GF ({run['method']})"
            axes.plot(*zip(*curve), marker="o", linestyle=style, color=colours[k], label=label)
    for run in results["runs"]:
        if run["method"] == PER_STITCH:
            for r in run["stitches"]:
                axes.plot([tokens], [r["perplexity"]], marker="*", markersize=14, color=colours.get(r["stitch"]),
                          linestyle="none", label=f"{r['name']} tuned alone ({run['method']})")  # fmt: skip
    axes.set_xlabel("training tokens")
    axes.set_ylabel("held-out Python-docs perplexity")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def stitch_spec(text: str) -> tuple[int, ...]:
    """`--stitches` values: 'n,j' or 'n,j,a,b', with or without the parentheses of a stitch's name."""
    try:
        return tuple(int(x) for x in text.strip("() ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stitch: write 'n,j' or 'n,j,a,b', e.g. '0,0,3,7'"
        ) from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="family", help="the anchors, and the defaults below")
    p.add_argument("--small", help="small anchor folder (relative: under the cache dir)")
    p.add_argument("--large", help="large anchor folder (relative: under the cache dir)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, default=None, help="scratch: the searched palette, trainer output")
    p.add_argument("--methods", nargs="+", default=[*METHODS, PER_STITCH], choices=[*METHODS, PER_STITCH])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--per-stitch-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--per-stitch-as", choices=list(METHODS), default="esta-uniform", help="recipe of that baseline")
    p.add_argument(
        "--per-stitch-kinds", nargs="*", default=[], help="kinds or names, e.g. 'small anchor' '(3, 5)' (default all)"
    )
    p.add_argument(
        "--train-stitches", nargs="*", default=[], help="the palette methods train only these kinds or names"
    )
    p.add_argument(
        "--stitch-weights",
        nargs="+",
        type=float,
        help="uniform sampling's share of the steps for each stitch --train-stitches matches, in palette order",
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--full-learning-rate", type=float, default=3e-4)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2r, so the scale alpha / r stays 2)")
    p.add_argument("--budgets", type=int)
    p.add_argument("--skip-sizes", nargs="+", type=int, help="sizes of the layer blocks the search may skip")
    p.add_argument(
        "--stitches",
        nargs="+",
        type=stitch_spec,
        help="train these stitches instead of searching, e.g. '4,8' '0,0,3,7' (the large anchor, layers 3-6 skipped)",
    )
    p.add_argument("--every", type=int, help="search every k-th of SN-Net's stitches")
    p.add_argument("--spread", type=int, help="and their neighbours n +- spread")
    p.add_argument("--train-chars", type=int, default=1_000_000)
    p.add_argument("--calibration-rows", type=int)
    p.add_argument("--validation-rows", type=int)
    p.add_argument("--test-rows", type=int)
    p.add_argument("--second-test", choices=["shakespeare", "wordnet"])
    p.add_argument("--wordnet-rows", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="also measure every stitch every N steps of a run")
    p.add_argument("--keep-trained", action="store_true", help="save each palette run to <work>/trained/")
    p.add_argument(
        "--reuse-search", action="store_true", help="reuse <work>/searched and the untuned rows of results.json"
    )
    p.add_argument("--report", action="store_true", help="only write <out>/report.md from results.json")
    p.add_argument(
        "--curve-methods", nargs="*", default=[], choices=list(METHODS), help="long runs, evaluated as they go"
    )
    p.add_argument("--curve-steps", type=int, default=1500)
    p.add_argument("--curve-every", type=int, default=250)
    pair = p.parse_known_args(argv)[0].pair
    p.set_defaults(**PAIRS[pair])
    args = p.parse_args(argv)
    args.out = Path(args.out)
    # alpha = 2r keeps LoRA's scale (alpha / r) at the default 16 / 8 for every rank, so runs of different ranks
    # differ only in the rank (which still changes how far one step moves the adapted weights).
    if args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora_r
    if args.report:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    cache = resolve_cache_dir(args.cache_dir)
    args.small, args.large = (str(cache / path) for path in (args.small, args.large))  # absolute paths stay
    args.work = Path(args.work or args.out / "tmp")
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.small)
    data = load_data(cache, tokenizer, args)
    log(f"data: {len(data['train'])} training blocks of {args.block} tokens")
    path = args.out / "results.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if args.reuse_search and "untuned" in old and (args.work / "searched").is_dir():
        spec, data["untuned"] = old["search"], old["untuned"]  # the saved palette is that search's result
        log(f"search: reused {args.work / 'searched'} and its untuned rows from {path}")
    else:
        spec = search(data, args)
        data["untuned"] = evaluate(fresh_palette(args), data, args)
    log("untuned: " + ", ".join(f"{r['name']}: {r['perplexity']:.2f}" for r in data["untuned"]))
    import peft
    import transformers

    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("cache_dir", "report", "out", "work", "small", "large")
    }
    settings |= {"small": Path(args.small).name, "large": Path(args.large).name}
    settings["tokens_per_run"] = args.steps * args.batch_size * args.block
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, fp32",
        "settings": settings,
        "search": spec,
        "untuned": data["untuned"],
        "runs": [],
    }
    if old.get("search", {}).get("stitches") == results["search"]["stitches"]:
        results["runs"] = old["runs"]  # keep finished runs of an earlier, interrupted call with the same stitches
    if args.curve_methods:  # quality against training tokens, written to curve.json as each run ends
        curve_path = args.out / "curve.json"
        curve = {"settings": results["settings"] | {"curve_steps": args.curve_steps}, "runs": []}
        if curve_path.is_file():  # keep an earlier call's runs of the same stitches and steps (other seeds)
            earlier = json.loads(curve_path.read_text())
            stitches = earlier.get("stitches", results["search"]["stitches"])  # files before this key: trusted
            steps = earlier["settings"].get("curve_steps")
            if stitches != results["search"]["stitches"] or steps != args.curve_steps:
                raise SystemExit(
                    f"{curve_path} holds curves of other stitches or steps ({stitches}, {steps} steps; this call: "
                    f"{results['search']['stitches']}, {args.curve_steps}); pass another --out to keep both"
                )
            curve["runs"] = earlier["runs"]
        curve["stitches"] = results["search"]["stitches"]
        for seed in args.seeds:
            for method in args.curve_methods:
                if any(r["method"] == method and r["seed"] == seed for r in curve["runs"]):
                    continue
                curve["runs"].append(run_curve(method, seed, data, args))
                curve_path.write_text(json.dumps(curve, indent=1) + "\n")
        curve_report(args.out)
        return
    done = {(r["method"], r["seed"]): r for r in results["runs"]}
    path.write_text(json.dumps(results, indent=1) + "\n")
    for seed in sorted(set(args.seeds) | set(args.per_stitch_seeds)):
        for method in args.methods:
            seeds = args.per_stitch_seeds if method == PER_STITCH else args.seeds
            earlier = done.get((method, seed))
            if seed not in seeds or (earlier and method != PER_STITCH):
                continue
            # A per-stitch run adds the stitches an earlier call of it did not train (other --per-stitch-kinds).
            skip = {r["stitch"] for r in earlier["stitches"]} if earlier else set()
            result = run_method(method, seed, data, args, skip=skip) | {"machine": results["machine"]}
            if not result["stitches"]:
                continue
            losses = ", ".join(f"{r['name']}: {math.exp(r['loss']):.2f}" for r in result["stitches"])
            log(f"{method} seed {seed} ({result['seconds']} s): ppl {losses}")
            if earlier:
                earlier["stitches"] = sorted(earlier["stitches"] + result["stitches"], key=lambda r: r["stitch"])
                earlier["seconds"] += result["seconds"]
            else:
                results["runs"].append(result)
            path.write_text(json.dumps(results, indent=1) + "\n")
    report(args.out)


if __name__ == "__main__":
    main()

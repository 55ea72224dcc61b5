"""The full comparison on the small pretrained family (`pretrain_family.py`): every method, same data, same budget.

    python benchmarks/bench_family.py --out docs/results/family --seeds 0 1 2 --steps 300

1. **Search.** Fit every candidate stitch (SN-Net's, their neighbours, and the large anchor with the block of 1, 2
   or 3 layers that changes its state least, alone and after a stitch), measure held-out loss on a validation
   slice, and keep the best stitch per FLOPs budget (`stitched_llama.search.search_palette`).
2. **Train** that palette, from the same least-squares start, with each method for `--steps` optimizer steps of
   the same text batches (healing on generic text, every token scored):
   - `esta-importance`: shared LoRA + stitch biases, SNIP importance sampling (the paper);
   - `esta-uniform`: the same, uniform sampling;
   - `esta-loss-gap`: the same, sampling by how far a stitch's running loss lies above the cheaper stitches';
   - `esta-distill`: uniform sampling, loss mixed with distillation from the frozen large anchor;
   - `snnet-full`: SN-Net direct adaptation (every anchor weight trained, uniform);
   - `lora-per-stitch`: one LoRA per stitch, each given the whole step budget (the upper reference, and the
     "tune each size separately" baseline: it includes the anchors and the layer-dropped large anchor).
3. **Evaluate** every stitch on the held-out Python docs (test slice, never seen by the search) and Shakespeare.

Results go to `<out>/results.json` after every run, so a stopped run keeps what it finished; `--report` writes
`<out>/family.md` (means and spread over seeds) from them.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import TEXT_DIR, resolve_cache_dir  # noqa: E402

METHODS = {  # name -> StitchTrainingArguments overrides
    "esta-importance": dict(method="esta", sampling="importance"),
    "esta-uniform": dict(method="esta", sampling="uniform"),
    "esta-loss-gap": dict(method="esta", sampling="loss-gap"),
    "esta-distill": dict(method="esta", sampling="uniform", distill_alpha=0.5, distill_temperature=1.0),
    "snnet-full": dict(method="snnet-full", sampling="uniform"),
}
PER_STITCH = "lora-per-stitch"


def log(msg: str) -> None:
    print(f"[bench_family {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def blocks(tokenizer, path: Path, block: int, start: int, count: int) -> list[dict]:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    rows = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)][start : start + count]
    return [{"input_ids": r, "attention_mask": [1] * block, "labels": r} for r in rows]


def load_data(cache: Path, tokenizer, args) -> dict:
    from datasets import Dataset

    from stitched_llama.data import tokenize_texts

    text = cache / TEXT_DIR
    train_texts = []
    for name in ("python_docs_calib.txt", "shakespeare_train.txt"):
        train_texts += text.joinpath(name).read_text(encoding="utf-8")[: args.train_chars].split("\n\n\n")
    train = tokenize_texts(train_texts, tokenizer, block_size=args.block)
    train = train.filter(lambda ids: len(ids) == args.block, input_columns="input_ids").shuffle(seed=0)
    pydoc = text / "python_docs_heldout.txt"
    return {
        "train": train,
        "calibration": train.select(range(args.calibration_rows)),
        "validation": blocks(tokenizer, pydoc, args.block, args.test_rows, args.validation_rows),
        "test_pydoc": Dataset.from_list(blocks(tokenizer, pydoc, args.block, 0, args.test_rows)),
        "test_shakespeare": Dataset.from_list(
            blocks(tokenizer, text / "shakespeare_heldout.txt", args.block, 0, args.test_rows)
        ),
    }


def evaluate(model, data: dict) -> list[dict]:
    from stitched_llama.evaluation import evaluate_palette

    rows = evaluate_palette(model, data["test_pydoc"], batch_size=16, progress=False)
    shakespeare = evaluate_palette(model, data["test_shakespeare"], batch_size=16, progress=False)
    keep = ("stitch", "name", "kind", "flops_per_token", "params", "loss", "perplexity")
    return [{**{k: r[k] for k in keep}, "shakespeare_loss": s["loss"]} for r, s in zip(rows, shakespeare)]


def training_args(out: Path, seed: int, steps: int, args, **overrides):
    from stitched_llama.demo import healing_arguments

    learning_rate = overrides.pop("learning_rate", args.learning_rate)
    return healing_arguments(out, steps, learning_rate, seed, args.batch_size, lora_r=args.lora_r, **overrides)


def fresh_palette(spec: dict, args):
    """The searched palette, rebuilt from the pretrained anchors (weights reloaded, so runs share nothing)."""
    from transformers import AutoModelForCausalLM

    from stitched_llama import StitchedLlamaForCausalLM

    small = AutoModelForCausalLM.from_pretrained(args.family / "small", dtype=torch.float32)
    large = AutoModelForCausalLM.from_pretrained(args.family / "large", dtype=torch.float32)
    return StitchedLlamaForCausalLM.from_anchors(
        small, large, stitches=spec["stitches"], calibration=spec["calibration"], share_stitch_layers=False
    ).eval()


class OneStitch:
    """Restricts a `StitchTrainer` to one stitch: the per-stitch LoRA baseline trains each stitch alone."""

    @staticmethod
    def trainer(palette, stitch: int, **kwargs):
        from stitched_llama.trainer import StitchTrainer

        class OneStitchTrainer(StitchTrainer):
            def _stitch_for_step(self) -> int:
                self.sampler.counts[stitch] += self._step_of_stitch != self.state.global_step
                self._step_stitch, self._step_of_stitch = stitch, self.state.global_step
                return stitch

        return OneStitchTrainer(model=palette, **kwargs)


def run_method(name: str, seed: int, spec: dict, data: dict, args) -> dict:
    from stitched_llama.esta import merge_esta
    from stitched_llama.trainer import StitchTrainer

    torch.manual_seed(seed)
    palette = fresh_palette(spec, args)
    t0 = time.perf_counter()
    if name == PER_STITCH:
        rows = []
        for k in range(palette.num_stitches):
            palette = fresh_palette(spec, args)
            targs = training_args(args.out / "tmp", seed, args.steps, args, method="esta", sampling="uniform")
            trainer = OneStitch.trainer(palette, k, args=targs, train_dataset=data["train"])
            trainer.train()
            rows.append(evaluate(merge_esta(trainer.model), data)[k])
            log(f"{name} seed {seed}: stitch {k} {rows[-1]['name']} loss {rows[-1]['loss']:.4f}")
    else:
        overrides = dict(METHODS[name])
        if name == "snnet-full":
            overrides["learning_rate"] = args.full_learning_rate
        targs = training_args(args.out / "tmp", seed, args.steps, args, **overrides)
        trainer = StitchTrainer(model=palette, args=targs, train_dataset=data["train"])
        trainer.train()
        rows = evaluate(merge_esta(trainer.model), data)
        visits = trainer.sampler.counts
        for row in rows:
            row["visits"] = visits[row["stitch"]]
    return {"method": name, "seed": seed, "seconds": round(time.perf_counter() - t0), "stitches": rows}


def run_curve(name: str, seed: int, spec: dict, data: dict, args) -> dict:
    """One long run of `name`, evaluating every stitch every `--curve-every` steps: quality against tokens."""
    from transformers import TrainerCallback

    from stitched_llama.trainer import StitchTrainer

    torch.manual_seed(seed)
    palette = fresh_palette(spec, args)
    targs = training_args(args.out / "tmp", seed, args.curve_steps, args, **METHODS[name])
    points = []

    class Curve(TrainerCallback):
        def on_step_end(self, targs_, state, control, model=None, **kwargs):
            if state.global_step % args.curve_every == 0:
                rows = evaluate(model, data)
                tokens = state.global_step * args.batch_size * args.block
                points.append({"step": state.global_step, "tokens": tokens, "stitches": rows})
                log(
                    f"curve {name} step {state.global_step}: "
                    + ", ".join(f"{r['name']}: {r['perplexity']:.1f}" for r in rows)
                )

    trainer = StitchTrainer(model=palette, args=targs, train_dataset=data["train"], callbacks=[Curve()])
    trainer.train()
    return {"method": name, "seed": seed, "points": points}


def search(data: dict, args) -> dict:
    from transformers import AutoModelForCausalLM

    from stitched_llama.search import candidate_stitches, format_search_table, layer_skip_blocks, search_palette

    small = AutoModelForCausalLM.from_pretrained(args.family / "small", dtype=torch.float32).eval()
    large = AutoModelForCausalLM.from_pretrained(args.family / "large", dtype=torch.float32).eval()
    calibration = data["calibration"]
    blocks_ = layer_skip_blocks(large, calibration, block_sizes=(1, 2, 3))
    from stitched_llama import StitchedLlamaConfig

    config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
    candidates = candidate_stitches(config, blocks_)
    t0 = time.perf_counter()
    palette, rows = search_palette(
        small,
        large,
        candidates,
        calibration,
        data["validation"],
        num_budgets=args.budgets,
        evaluate_kwargs={"progress": False, "batch_size": 16},
    )
    log(f"search: {len(candidates)} candidates in {time.perf_counter() - t0:.0f} s\n{format_search_table(rows)}")
    return {
        "blocks": blocks_,
        "stitches": [list(s) for s in palette.config.stitches],
        "table": [{k: r[k] for k in ("name", "kind", "flops_per_token", "loss", "kept")} for r in rows],
        "calibration": calibration,
    }


def report(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    names = [r["name"] for r in results["untuned"]]
    flops = [r["flops_per_token"] for r in results["untuned"]]
    methods = ["untuned", *dict.fromkeys(r["method"] for r in runs)]
    lines = [
        "# Small-family comparison",
        "",
        f"Machine: {results['machine']}. Settings: {json.dumps(results['settings'])}.",
        "",
        "Held-out Python-docs perplexity per stitch (mean ± standard deviation over seeds; n = seeds run).",
        "",
        "| stitch | kind | MFLOPs/token | " + " | ".join(methods) + " |",
        "|---|---|---:|" + "---:|" * len(methods),
    ]
    for i, name in enumerate(names):
        cells = []
        for method in methods:
            if method == "untuned":
                values = [results["untuned"][i]["perplexity"]]
            else:
                values = [r["stitches"][i]["perplexity"] for r in runs if r["method"] == method]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f} (n=1)")
            else:
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})")
        kind = results["untuned"][i]["kind"]
        lines.append(f"| {name} | {kind} | {flops[i] / 1e6:.2f} | " + " | ".join(cells) + " |")
    (out / "family.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", type=Path, default=ROOT / "stitched_llama/assets/family")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/family")
    p.add_argument("--methods", nargs="+", default=[*METHODS, PER_STITCH], choices=[*METHODS, PER_STITCH])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--per-stitch-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--full-learning-rate", type=float, default=3e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--budgets", type=int, default=6)
    p.add_argument("--train-chars", type=int, default=1_000_000)
    p.add_argument("--calibration-rows", type=int, default=64)
    p.add_argument("--validation-rows", type=int, default=24)
    p.add_argument("--test-rows", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only write family.md from results.json")
    p.add_argument(
        "--curve-methods", nargs="*", default=[], choices=list(METHODS), help="long runs, evaluated as they go"
    )
    p.add_argument("--curve-steps", type=int, default=1500)
    p.add_argument("--curve-every", type=int, default=250)
    args = p.parse_args(argv)
    if args.report:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.family / "small")
    data = load_data(resolve_cache_dir(args.cache_dir), tokenizer, args)
    log(f"data: {len(data['train'])} training blocks of {args.block} tokens")
    spec = search(data, args)
    untuned = evaluate(fresh_palette(spec, args), data)
    import transformers

    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("cache_dir", "report")
    }
    settings["tokens_per_run"] = args.steps * args.batch_size * args.block
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, fp32",
        "settings": {k: v for k, v in settings.items() if k not in ("out", "family")},
        "search": {k: v for k, v in spec.items() if k != "calibration"},
        "untuned": untuned,
        "runs": [],
    }
    path = args.out / "results.json"
    if path.is_file():  # keep finished runs of an earlier, interrupted call with the same stitches
        old = json.loads(path.read_text())
        if old.get("search", {}).get("stitches") == results["search"]["stitches"]:
            results["runs"] = old["runs"]
    if args.curve_methods:  # quality against training tokens, written to curve.json as each run ends
        curve_path = args.out / "curve.json"
        curve = {"settings": results["settings"] | {"curve_steps": args.curve_steps}, "runs": []}
        for method in args.curve_methods:
            curve["runs"].append(run_curve(method, args.seeds[0], spec, data, args))
            curve_path.write_text(json.dumps(curve, indent=1) + "\n")
        return
    done = {(r["method"], r["seed"]) for r in results["runs"]}
    path.write_text(json.dumps(results, indent=1) + "\n")
    for seed in sorted(set(args.seeds) | set(args.per_stitch_seeds)):
        for method in args.methods:
            seeds = args.per_stitch_seeds if method == PER_STITCH else args.seeds
            if seed not in seeds or (method, seed) in done:
                continue
            result = run_method(method, seed, spec, data, args)
            losses = ", ".join(f"{r['name']}: {math.exp(r['loss']):.1f}" for r in result["stitches"])
            log(f"{method} seed {seed} ({result['seconds']} s): ppl {losses}")
            results["runs"].append(result)
            path.write_text(json.dumps(results, indent=1) + "\n")
    report(args.out)


if __name__ == "__main__":
    main()

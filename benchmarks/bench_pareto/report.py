"""The report: per-setting summaries of the phases' JSON, claim checks, markdown tables, transcripts and plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .measure import log
from .settings import ANCHORS

LABELS = {
    "init": "LS init (no tuning)",
    "esta-importance": "ESTA, importance sampling",
    "esta-uniform": "ESTA, uniform sampling",
    "snnet-full": "SN-Net direct adaptation",
}


def build_report(out: Path, settings_run: list[str]) -> None:
    sections, transcript_sections = [], []
    for name in settings_run:
        raw = out / "raw" / name
        results = {p: json.loads((raw / f"{p}.json").read_text()) for p in LABELS if (raw / f"{p}.json").exists()}
        diag = raw / "diag-pos0.json"
        diagnostic = json.loads(diag.read_text()) if diag.exists() else None
        sink_file = raw / "diag-sink.json"
        sink = json.loads(sink_file.read_text()) if sink_file.exists() else None
        if "init" not in results:
            continue
        summary = summarize(results, diagnostic, sink)
        (out / f"pareto_{name}.json").write_text(json.dumps(summary, indent=1))
        plot(summary, out / f"pareto_{name}.png", name)
        sections.append(markdown(summary, name))
        transcript_sections.append(transcript_markdown(results, name))
    if not sections:
        raise SystemExit(f"No results under {out / 'raw'}: run the init phase first.")
    (out / "pareto.md").write_text("\n\n".join(sections) + "\n")
    (out / "transcripts.md").write_text("\n\n".join(transcript_sections) + "\n")
    log(f"wrote {out / 'pareto.md'}, {out / 'transcripts.md'} and pareto_*.json/png")


def summarize(results: dict, diagnostic: dict | None = None, sink: dict | None = None) -> dict:
    init = results["init"]
    table = init["stitch_table"]
    summary: dict[str, Any] = {
        "setting": init["setting"],
        "machine": init["machine"],
        "stitches": [
            {k: r[k] for k in ("stitch", "n", "j", "kind", "layers", "params", "flops_per_token")} for r in table
        ],
        "fit_errors": init["fit_errors"],
        "calibration_tokens": init["calibration_tokens"],
        "phases": {},
    }
    for phase, r in results.items():
        ev = r["eval"]
        entry: dict[str, Any] = {
            "seconds": r["seconds"],
            "load_average_1m": [r["machine"]["load_average_1m"], r["load_average_1m_end"]],
            "process_peak_rss_gib": r["process_peak_rss_gib"],
            "wordnet_test_perplexity": [x["perplexity"] for x in ev["wordnet_test"]],
            "wordnet_test_loss": [x["loss"] for x in ev["wordnet_test"]],
            "wordnet_test_tokens": ev["wordnet_test"][0]["tokens"],
            "token_f1": [x["token_f1"] for x in ev["wordnet_generation"]],
        }
        for key, rows in ev.items():
            if key.startswith("heldout_") and not key.endswith("_seconds"):
                entry[f"{key}_perplexity"] = [x["perplexity"] for x in rows]
                entry[f"{key}_tokens"] = rows[0]["tokens"]
        if phase != "init":
            steps = sorted(r["step_seconds"])
            entry.update(
                {
                    "method": r["method"],
                    "sampling": r["sampling"],
                    "optimizer": r["optimizer"],
                    "learning_rate": r["learning_rate"],
                    "max_grad_norm": r["max_grad_norm"],
                    "steps": r["steps"],
                    "train_examples": r["train_examples"],
                    "trainable": r["trainable_parameters"]["trainable"],
                    "trainable_percent": r["trainable_parameters"]["trainable_percent"],
                    "total_parameters": r["trainable_parameters"]["total"],
                    "memory": r["memory"],
                    "median_step_seconds": steps[len(steps) // 2] if steps else None,
                    "mean_step_seconds": sum(steps) / len(steps) if steps else None,
                    "train_runtime": r["train_runtime"],
                    "visits": [row["visits"] for row in r["esta_report"]["stitches"]],
                    "importance": [row["importance"] for row in r["esta_report"]["stitches"]],
                    "deployed": r["esta_report"]["deployed_stitches"],
                    "train_loss_per_stitch": _train_loss_per_stitch(r),
                }
            )
        summary["phases"][phase] = entry
    if diagnostic is not None and "eval" in diagnostic:
        summary["diag_outliers"] = diagnostic.get("outliers")
        summary["diag_pos0"] = {
            "heldout_python_docs_perplexity": [x["perplexity"] for x in diagnostic["eval"]["heldout_python_docs"]],
            "pos0_relative_spread_large": diagnostic["pos0_relative_spread_large"],
            "pos0_relative_gap_stitched": diagnostic["pos0_relative_gap_stitched"],
        }
    if sink is not None and "rows" in sink:
        summary["diag_sink"] = sink["rows"]
    summary["claims"] = check_claims(summary)
    return summary


def _train_loss_per_stitch(r: dict) -> list[float | None]:
    sums: dict[int, list[float]] = {}
    for entry in r["log_history"]:
        for key, value in entry.items():
            m = re.fullmatch(r"stitch_(\d+)/loss", key)
            if m:
                sums.setdefault(int(m.group(1)), []).append(value)
    n = len(r["esta_report"]["stitches"])
    return [sum(sums[k]) / len(sums[k]) if k in sums else None for k in range(n)]


def _front(flops: list[float], perplexity: list[float]) -> list[int]:
    """Stitches no other beats on both cost and perplexity (`stitched_llama.evaluation.pareto_front`)."""
    from stitched_llama.evaluation import pareto_front

    return pareto_front(
        [{"stitch": k, "flops_per_token": c, "perplexity": p} for k, (c, p) in enumerate(zip(flops, perplexity))]
    )


def check_claims(summary: dict) -> dict:
    claims: dict[str, Any] = {}
    init = summary["phases"]["init"]
    flops = [s["flops_per_token"] for s in summary["stitches"]]
    ppl = init.get("heldout_python_docs_perplexity")
    if ppl:
        small, large = ppl[0], ppl[-1]
        hybrids = ppl[1:-1]
        claims["ls_init_between_anchors"] = all(large <= p <= small for p in hybrids)
        claims["ls_init_monotone_in_cost"] = all(a >= b for a, b in zip(ppl, ppl[1:]))
        claims["ls_init_hybrid_over_small_ratio"] = [p / small for p in hybrids]
        claims["ls_init_worst_ratio"] = max(p / small for p in hybrids) if hybrids else None
    phases = summary["phases"]
    for a, b in (
        ("esta-importance", "snnet-full"),
        ("esta-uniform", "snnet-full"),
        ("esta-importance", "esta-uniform"),
    ):
        if a in phases and b in phases:
            la, lb = phases[a]["wordnet_test_loss"], phases[b]["wordnet_test_loss"]
            fa, fb = phases[a]["token_f1"], phases[b]["token_f1"]
            claims[f"{a}_vs_{b}"] = {
                "stitches_lower_loss": sum(x <= y for x, y in zip(la, lb)),
                "stitches": len(la),
                "mean_loss": [sum(la) / len(la), sum(lb) / len(lb)],
                "mean_token_f1": [sum(fa) / len(fa), sum(fb) / len(fb)],
                "frontier": [
                    _front(flops, phases[a]["wordnet_test_perplexity"]),
                    _front(flops, phases[b]["wordnet_test_perplexity"]),
                ],
            }
    return claims


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (x >= 1e4 or math.isinf(x)):
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def markdown(summary: dict, name: str) -> str:
    s, m = summary["setting"], summary["machine"]
    anchors, weights = ANCHORS[s.get("anchors", "qwen")]  # results from before --anchors are Qwen's
    phases = summary["phases"]
    total = next((e["total_parameters"] for e in phases.values() if "total_parameters" in e), 0)
    total = total or summary["stitches"][0]["params"] + summary["stitches"][-1]["params"]
    init = phases["init"]
    stitches = summary["stitches"]
    lines = [
        f"## Measured Pareto front: {anchors}, `{name}` setting",
        "",
        "Produced by `python -m benchmarks.bench_pareto --setting "
        f"{name}` (raw numbers in `docs/results/pareto_{name}.json` and `docs/results/raw/{name}/`).",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; device `{s['device']}`; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        "- Other jobs shared the machine during this run (1-minute load average at start/end of each phase: "
        + ", ".join(f"{p} {v['load_average_1m'][0]}/{v['load_average_1m'][1]}" for p, v in phases.items())
        + "); times are wall-clock under that load.",
        f"- Dtype: fp32 weights{', bf16 autocast' if s['amp_bf16'] else ', no autocast'}. Anchors: {weights}.",
        f"- Palette: {len(stitches)} stitches (both anchors + {len(stitches) - 2} hybrids of the default palette, "
        "spread over the cost range); stitching layers shared per small-anchor cut `n`.",
        f"- LS init: {summary['calibration_tokens']} calibration tokens of python_docs_calib "
        f"({s['calib_tokens'] // s['calib_len']} windows x {s['calib_len']}), ridge 1e-2, first position of each "
        "window excluded (library default).",
        f"- Held-out text: {s['heldout_seqs']} windows x {s['heldout_len']} tokens spread over each file, every "
        "position but the first predicted.",
        f"- Fine-tuning: WordNet train records (seeded shuffle, records longer than {s['train_max_length']} tokens "
        f"skipped), batch {s['batch_size']}, {s['steps']} optimizer steps per method, linear schedule with "
        f"{s['warmup_steps']} warm-up steps, seed {s['seed']}, same examples in the same order for every method. "
        f"ESTA: LoRA r={s['lora_r']} alpha={2 * s['lora_r']} on q/k/v/o of both anchors and on the stitching layers "
        f"+ stitch-specific biases, AdamW lr {s['lr_lora']}, grad clip 1.0. SN-Net: every anchor and stitching-layer "
        f"weight trainable, uniform sampling, lr {s['lr_full']}, optimizer `{s['snnet_optimizer']}`"
        + (
            " (Adafactor without first moment, update clipping 1.0, applied per parameter during backward and the "
            f"gradient freed at once: fp32 AdamW would need 16 bytes x {total / 1e9:.2f}B parameters = "
            f"{16 * total / 1e9:.0f} GB for weights, gradients and moments, more than this machine has)"
            if s["snnet_optimizer"] == "adafactor-fused"
            else ""
        )
        + ".",
        f"- WordNet test: {init['wordnet_test_tokens']} response tokens from {s['eval_examples']} test records "
        f"(loss on the response and its end-of-turn token); token F1: greedy answers (at most "
        f"{s['max_new_tokens']} new tokens) to {s['gen_examples']} of those prompts vs the reference gloss "
        "(SQuAD-style bag of words).",
        "",
    ]
    ppl = init.get("heldout_python_docs_perplexity")
    diag = summary.get("diag_pos0")
    if ppl:
        lines += [
            "### (a) After least-squares init, before tuning: held-out python-docs perplexity",
            "",
            "| stitch | (n, j) | kind | GFLOPs/token | params | P_n fit error | perplexity | / small anchor |"
            + (" with position 0 -> large's constant (diagnostic) | position-0 gap after P_n |" if diag else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if diag else ""),
        ]
        for i, (st, p) in enumerate(zip(stitches, ppl)):
            err = summary["fit_errors"].get(str(st["n"])) if st["kind"] == "hybrid" else None
            row = (
                f"| {st['stitch']} | ({st['n']}, {st['j']}) | {st['kind']} | {st['flops_per_token'] / 1e9:.2f} | "
                f"{st['params'] / 1e9:.3f}B | {_fmt(err, 3)} | {_fmt(p)} | {_fmt(p / ppl[0])} |"
            )
            if diag:
                hybrid = st["kind"] == "hybrid"
                fixed = diag["heldout_python_docs_perplexity"][i]
                gap = diag["pos0_relative_gap_stitched"].get(str(i))
                row += f" {_fmt(fixed) if hybrid else '-'} | {_fmt(gap, 2) if hybrid else '-'} |"
            lines.append(row)
        lines.append("")
        if diag:
            spread = ", ".join(f"j={j}: {v:.3f}" for j, v in diag["pos0_relative_spread_large"].items())
            lines += [
                "Diagnostic (`--phases diag-pos0`, not a library feature): position 0 after the stitching layer "
                "replaced by the large anchor's mean position-0 state entering layer j (mean over the calibration "
                "windows' first tokens). How much the large anchor's position-0 state varies with the token (mean "
                f"relative distance to that mean): {spread}; 'position-0 gap after P_n' is the relative distance "
                "between what the LS-fitted P_n produces at position 0 and the large anchor's own state there.",
                "",
            ]
    outliers = (summary.get("diag_outliers") or {}).get("stitches")
    if outliers:
        lines += [
            "Diagnostic (`--phases diag-pos0`): do tokens with huge hidden-state norms past position 0 dominate the "
            f"fit? Refitted on {summary['diag_outliers']['calibration_tokens']} of the calibration tokens; "
            "'outliers' are tokens whose target norm (large anchor entering layer j) exceeds 5x the median; errors "
            "are relative (||XW - Y|| / ||Y||) on the held-out windows; the last column is the held-out perplexity "
            "with P_n refitted without the outlier tokens (not a library feature).",
            "",
            "| stitch | (n, j) | target norm median / p99 / max | outlier share | top-1% share of sum sq | "
            "library fit: error all / ordinary / outliers | outlier-free fit: error ordinary / outliers | "
            "perplexity, library fit | perplexity, outlier-free fit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, r in outliers.items():
            lines.append(
                f"| {k} | ({r['n']}, {r['j']}) | {r['target_norm_median']:.1f} / {r['target_norm_p99']:.1f} / "
                f"{r['target_norm_max']:.1f} | {100 * r['outlier_share_calibration']:.2f}% | "
                f"{100 * r['sum_sq_share_top1pct']:.1f}% | {_fmt(r['heldout_err_library_fit'], 3)} / "
                f"{_fmt(r['heldout_err_library_fit_ordinary'], 3)} / {_fmt(r['heldout_err_library_fit_outliers'], 3)} | "
                f"{_fmt(r['heldout_err_outlier_free_fit_ordinary'], 3)} / "
                f"{_fmt(r['heldout_err_outlier_free_fit_outliers'], 3)} | {_fmt(ppl[int(k)]) if ppl else 'n/a'} | "
                f"{_fmt(r.get('heldout_perplexity_outlier_free_fit'))} |"
            )
        tokens = sorted({t for r in outliers.values() for t in r["outlier_tokens_heldout"]})[:40]
        lines += ["", f"Outlier tokens seen in the held-out windows: {json.dumps(tokens)}", ""]
    sink = summary.get("diag_sink")
    if sink:
        lines += [
            "Diagnostic (`--phases diag-sink`, not a library feature): sink-aware stitching. Tokens whose small-anchor "
            "state norm exceeds 5x the median (the later attention-sink tokens) are mapped to the large anchor's mean "
            "state at those tokens, position 0 to its mean position-0 state, and P_n is refitted on all other tokens "
            "(library objective and ridge, all calibration windows). Held-out python-docs perplexity:",
            "",
            "| stitch | (n, j) | library LS | sink-aware | / small anchor | later sinks in calibration (small / large "
            "/ both) | cosine(position-0 state, later-sink state) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r in sink.items():
            value = r.get("heldout_perplexity_sink_aware")
            lines.append(
                f"| {k} | ({r['n']}, {r['j']}) | {_fmt(ppl[int(k)]) if ppl else 'n/a'} | {_fmt(value)} | "
                f"{_fmt(value / ppl[0]) if value and ppl else 'n/a'} | {r['small_sinks']} / {r['large_sinks']} / "
                f"{r['sinks_in_both']} | {_fmt(r['cosine_first_vs_later_sinks'], 3) if r['small_sinks'] else 'n/a'} |"
            )
        lines.append("")
    order = [p for p in LABELS if p in phases]
    lines += [
        "### (b) WordNet test perplexity / token F1 per stitch",
        "",
        "| stitch | (n, j) | GFLOPs/token | " + " | ".join(LABELS[p] for p in order) + " |",
        "|---|---|---|" + "---|" * len(order),
    ]
    for i, st in enumerate(stitches):
        cells = [f"{_fmt(phases[p]['wordnet_test_perplexity'][i])} / {phases[p]['token_f1'][i]:.3f}" for p in order]
        lines.append(
            f"| {st['stitch']} | ({st['n']}, {st['j']}) | {st['flops_per_token'] / 1e9:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    trained = [p for p in order if p != "init"]
    if trained:
        lines += [
            "### (c) Cost of each method",
            "",
            "| method | trainable params | trainable % | peak RSS during training | RSS before training | "
            "peak CUDA | median s/step | mean s/step | train loss | stitch visits | deployed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in trained:
            e = phases[p]
            mem = e["memory"]
            lines.append(
                f"| {LABELS[p]} (`{e['optimizer']}`, lr {e['learning_rate']}) | {e['trainable']:,} | "
                f"{e['trainable_percent']:.3f} | {mem['peak_rss_gib']:.2f} GiB | {mem['rss_before_gib']:.2f} GiB | "
                f"{_fmt(mem['peak_cuda_allocated_gib'])} | {_fmt(e['median_step_seconds'], 1)} | "
                f"{_fmt(e['mean_step_seconds'], 1)} | "
                f"{_fmt(sum(e['wordnet_test_loss']) / len(e['wordnet_test_loss']), 3)} (test, mean) | "
                f"{e['visits']} | {e['deployed']} |"
            )
        lines.append("")
    lines += ["### Claim checks (computed)", "", "```json", json.dumps(summary["claims"], indent=1), "```", ""]
    lines.append(f"![Pareto plot](pareto_{name}.png)")
    return "\n".join(lines)


def transcript_markdown(results: dict, name: str) -> str:
    init = results["init"]
    prompts = init["transcript_prompts"]
    table = {r["stitch"]: r for r in init["stitch_table"]}
    lines = [
        f"## Chat transcripts, `{name}` setting",
        "",
        "Greedy decoding, Qwen chat template (default system prompt), at most "
        f"{init['setting']['transcript_new_tokens']} new tokens: answers may stop mid-sentence. 'Before' is the "
        "least-squares-initialised palette; 'after' is the same palette after the ESTA importance-sampling run "
        "(LoRA merged, stitch biases kept). Real outputs, unedited.",
        "",
    ]
    after = results.get("esta-importance", {}).get("transcripts")
    for i, prompt in enumerate(prompts):
        lines += [f"### Prompt {i + 1}: {prompt}", ""]
        ref = init["transcript_references"].get(prompt)
        if ref:
            lines += [f"WordNet reference gloss: *{ref}*", ""]
        for j, row in enumerate(init["transcripts"]):
            st = table[row["stitch"]]
            head = (
                f"**stitch {st['stitch']} ({st['n']}, {st['j']}), {st['kind']}, "
                f"{st['flops_per_token'] / 1e9:.2f} GFLOPs/token**"
            )
            lines += [head, "", "before tuning:", *_fence(row["answers"][i])]
            if after:
                lines += ["after tuning:", *_fence(after[j]["answers"][i])]
    return "\n".join(lines)


def _fence(text: str) -> list[str]:
    """The answer verbatim in a tilde-fenced block (answers contain backtick fences of their own)."""
    return ["~~~text", text.replace("~~~", "~ ~ ~") if text else "(empty answer)", "~~~", ""]


def plot(summary: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [s["flops_per_token"] / 1e9 for s in summary["stitches"]]
    phases = summary["phases"]
    panels = [("heldout_python_docs_perplexity", "python-docs held-out perplexity (LS init)", ["init"])]
    panels.append(("wordnet_test_perplexity", "WordNet test perplexity", [p for p in LABELS if p in phases]))
    panels.append(("token_f1", "WordNet token F1 (higher is better)", [p for p in LABELS if p in phases]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (key, title, keys) in zip(axes, panels):
        for p in keys:
            values = phases[p].get(key)
            if not values:
                continue
            (line,) = ax.plot(flops, values, "o-", label=LABELS[p])
            ax.plot([flops[0], flops[-1]], [values[0], values[-1]], "*", ms=14, color=line.get_color())
        ax.set_xlabel("GFLOPs / token")
        ax.set_title(title)
        if key != "token_f1":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if summary.get("diag_sink"):
        values = [summary["diag_sink"].get(str(k), {}).get("heldout_perplexity_sink_aware") for k in range(len(flops))]
        axes[0].plot(flops[1:-1], values[1:-1], "s:", label="sink-aware stitching (diagnostic)")
        axes[0].legend(fontsize=8)
    if summary.get("diag_pos0"):
        values = summary["diag_pos0"]["heldout_python_docs_perplexity"]
        axes[0].plot(flops[1:-1], values[1:-1], "x--", label="LS init, position 0 -> large constant (diagnostic)")
        axes[0].legend(fontsize=8)
    axes[0].annotate("stars: anchors", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8)
    anchors = ANCHORS[summary["setting"].get("anchors", "qwen")][0]
    fig.suptitle(f"{anchors} palette, {name} setting ({summary['setting']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

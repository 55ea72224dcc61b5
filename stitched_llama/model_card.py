"""The model card (README.md) written with every saved or pushed palette.

It lists every stitch with its cost, its eval perplexity when known and whether it is deployed, shows the
accuracy-cost plot when one can be drawn, and gives the snippets to load, pick a stitch and generate.
"""

from __future__ import annotations

import os

from .evaluation import plot_pareto

PLOT_NAME = "pareto.png"


def stitch_rows(palette) -> list[dict]:
    """The stitch table plus eval metrics from the palette's report and deployed marks from its config."""
    config = palette.config
    metrics = palette.stitch_report.get("metrics", {})
    deployed = set(config.deployed_stitches or [])
    rows = []
    for row in palette.stitch_table():
        k = row["stitch"]
        row = {**row, **{key: value for key, value in metrics.get(str(k), {}).items()}, "deployed": k in deployed}
        if "eval_perplexity" in row:
            row["perplexity"] = row["eval_perplexity"]
        rows.append(row)
    return rows


def model_card(palette, plot_file: str | None = None, repo_id: str | None = None) -> str:
    config = palette.config
    rows = stitch_rows(palette)
    small = (
        config.small_config.name_or_path
        or f"{config.small_config.model_type} ({config.small_config.num_hidden_layers} layers)"
    )
    large = (
        config.large_config.name_or_path
        or f"{config.large_config.model_type} ({config.large_config.num_hidden_layers} layers)"
    )
    name = repo_id or "path/to/this/folder"
    has_ppl = any("perplexity" in r for r in rows)
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- stitched_llama",
        "- model-stitching",
        "- esta",
        "---",
        "",
        "# Stitched palette",
        "",
        f"One model holding {len(rows)} stitched language models between the small anchor `{small}` and the "
        f"large anchor `{large}`, built with `stitched_llama` (ESTA, CVPR 2024). Stitch "
        "`(n, j)` runs the first `n` layers of the small anchor, a linear stitching layer, then the large "
        "anchor from layer `j` on.",
        "",
        "| stitch | (n, j) | kind | layers | params | GFLOPs/token |"
        + (" eval ppl |" if has_ppl else "")
        + " deployed |",
        "|---|---|---|---|---|---|" + ("---|" if has_ppl else "") + "---|",
    ]
    for r in rows:
        ppl = f" {r['perplexity']:.2f} |" if "perplexity" in r else (" |" if has_ppl else "")
        lines.append(
            f"| {r['stitch']} | {r['name']} | {r['kind']} | {r['layers']} | {r['params'] / 1e6:.1f}M | "
            f"{r['flops_per_token'] / 1e9:.3f} |{ppl} {'yes' if r['deployed'] else ''} |"
        )
    if plot_file:
        lines += ["", f"![accuracy-cost frontier]({plot_file})"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
        "",
        "# the best stitch within a budget (parameters, FLOPs/token; latency and memory after profile_stitches())",
        'model.set_stitch(model.select_stitch(max_params="1B"))',
        "",
        'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                                       return_tensors="pt", return_dict=True)',
        "out = model.generate(**inputs, max_new_tokens=64)",
        "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "`generate(..., stitch=k)` runs stitch `k` for one call; `model.export_stitch(k, folder)` saves it alone.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(palette, save_directory: str | os.PathLike, repo_id: str | None = None) -> str:
    """Write README.md (and the plot, when metrics and matplotlib are there) into `save_directory`."""
    plot_file = None
    rows = stitch_rows(palette)
    if any("perplexity" in r for r in rows):
        plot_pareto(rows, os.path.join(save_directory, PLOT_NAME))
        plot_file = PLOT_NAME
    path = os.path.join(save_directory, "README.md")
    with open(path, "w") as f:
        f.write(model_card(palette, plot_file, repo_id))
    return path

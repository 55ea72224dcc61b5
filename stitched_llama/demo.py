"""`stitched-llama demo`: the whole job on the built-in model family, offline, in a few minutes on a CPU.

The family (`assets/family`, made by `benchmarks/pretrain_family.py`) is two small LLaMA models pretrained alike
on Python documentation, Shakespeare and WordNet glosses, sharing one BPE tokenizer. The demo searches a stitch
space (hybrids and the large anchor with a block of layers dropped), heals the palette with ESTA and distillation on
text the family was trained on, and measures every stitch on Python documentation it never saw.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import tokenize_texts
from .esta import trainable_parameters
from .evaluation import REPORT_FILES, evaluate_palette, format_markdown
from .search import candidate_stitches, layer_skip_blocks, search_palette
from .trainer import REPORT, StitchTrainer, StitchTrainingArguments
from .workflow import MERGED_DIR, train_palette

FAMILY = Path(__file__).resolve().parent / "assets" / "family"


def family_anchors(dtype: torch.dtype = torch.float32) -> tuple:
    """(small, large, tokenizer) of the built-in family."""
    if not (FAMILY / "large" / "config.json").is_file():
        raise FileNotFoundError(
            f"The built-in family is missing from {FAMILY}: reinstall the package, or rebuild it with "
            "`python benchmarks/pretrain_family.py`."
        )
    small = AutoModelForCausalLM.from_pretrained(FAMILY / "small", dtype=dtype).eval()
    large = AutoModelForCausalLM.from_pretrained(FAMILY / "large", dtype=dtype).eval()
    return small, large, AutoTokenizer.from_pretrained(FAMILY / "small")


def healing_arguments(
    output_dir: str | Path, steps: int, learning_rate: float, seed: int, batch_size: int = 8, **overrides
) -> StitchTrainingArguments:
    """The demo's and the family benchmark's training settings: LoRA on every linear, cosine schedule, no
    checkpoints, CPU unless a GPU is there; `overrides` are further `StitchTrainingArguments` fields."""
    settings = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
        lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )
    return StitchTrainingArguments(**{**settings, **overrides})


def _text(name: str) -> list[str]:
    return (FAMILY / "text" / name).read_text(encoding="utf-8").split("\n\n\n")


def run_demo(
    out: str | Path,
    steps: int = 400,
    learning_rate: float = 2e-3,
    distill_alpha: float = 0.5,
    seed: int = 0,
    block_size: int = 128,
    prompt: str = "The module provides",
    max_new_tokens: int = 24,
    heldout_blocks: int | None = None,
) -> dict:
    """Search -> ESTA -> evaluate -> generate on the family; returns the evaluation rows before and after.

    A quarter of the held-out blocks (`heldout_blocks` of them at most) measure the search, the rest the result.
    """
    start = time.perf_counter()
    out = Path(out)
    for name in (MERGED_DIR, "evaluation", REPORT):  # this demo's own outputs from an earlier run
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    torch.manual_seed(seed)
    small, large, tokenizer = family_anchors()
    train = tokenize_texts(_text("train.txt"), tokenizer, block_size=block_size, drop_last=True).shuffle(seed=seed)
    heldout = tokenize_texts(_text("heldout.txt"), tokenizer, block_size=block_size)
    if heldout_blocks is not None:  # a quicker, rougher measurement (the tests use it)
        heldout = heldout.select(range(min(heldout_blocks, len(heldout))))
    validation, test = (
        heldout.select(range(0, len(heldout), 4)),
        heldout.select([i for i in range(len(heldout)) if i % 4]),
    )
    calibration = train.select(range(min(48, len(train))))

    print("== 1/5 anchors: the built-in family, two LLaMA models pretrained alike on one BPE tokenizer")
    for name, anchor in (("small", small), ("large", large)):
        config = anchor.config
        print(
            f"{name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{anchor.num_parameters():,} parameters"
        )

    print("\n== 2/5 search: fit every candidate stitch, keep the best per FLOPs budget on held-out text")
    blocks = layer_skip_blocks(large, calibration, block_sizes=(1, 2, 3))
    print(f"large-anchor blocks that change its state least (angular distance): {blocks}")
    from .configuration_stitched_llama import StitchedLlamaConfig

    config = StitchedLlamaConfig(small_config=small.config, large_config=large.config)
    candidates = candidate_stitches(config, blocks)
    palette, search_rows = search_palette(
        small, large, candidates, calibration, validation, num_budgets=4, tokenizer=tokenizer,
        evaluate_kwargs={"progress": False},
    )  # fmt: skip
    kept = [r for r in search_rows if r["kept"]]
    print(f"{len(search_rows)} stitches measured, {len(kept)} kept: " + ", ".join(r["name"] for r in kept))
    print(palette.format_stitch_table())
    before = evaluate_palette(palette, test, progress=False)

    print(f"\n== 3/5 train: ESTA on all {palette.num_stitches} stitches at once, {steps} steps, distillation from")
    print(f"   the frozen large anchor (alpha {distill_alpha}), on {len(train)} blocks of text the family saw")
    args = healing_arguments(
        out, steps, learning_rate, seed, sampling="uniform", distill_alpha=distill_alpha, num_deployed_stitches=4
    )

    def show_trainable(trainer: StitchTrainer) -> None:
        counts = trainable_parameters(trainer.model)
        print(
            f"trainable: {counts['trainable']:,} of {counts['total']:,} parameters "
            f"({counts['trainable_percent']:.1f}%), one LoRA shared by all stitches + per-stitch biases; the "
            "anchors stay frozen"
        )

    # Saved to <out>/palette, merged, with the tokenizer and the model card.
    merged = train_palette(palette, args, train, tokenizer=tokenizer, before_training=show_trainable).palette

    print("\n== 4/5 evaluate: every stitch on held-out Python documentation (never trained on, never searched on)")
    rows = evaluate_palette(merged, test, output_dir=out / "evaluation", progress=False)
    print(format_markdown(rows))
    print(
        "\nperplexity before -> after: "
        + ", ".join(f"{b['name']}: {b['perplexity']:.1f} -> {a['perplexity']:.1f}" for b, a in zip(before, rows))
    )
    small_ppl = rows[0]["perplexity"]
    middle = [r for r in rows[1:-1] if r["perplexity"] < small_ppl]
    print(
        f"stitches between the anchors that beat the small anchor ({small_ppl:.1f}): "
        + (", ".join(f"{r['name']} ({r['perplexity']:.1f})" for r in middle) or "none")
    )

    print(f"\n== 5/5 generate: greedy continuations of {prompt!r}")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    for k in sorted({0, len(rows) // 2, len(rows) - 1}):
        with torch.no_grad():
            ids = merged.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, stitch=k)
        text = tokenizer.decode(ids[0, input_ids.shape[1] :], skip_special_tokens=True)
        print(f"stitch {k} {merged.config.stitch_name(k)}, {merged.config.stitch_kind(k)}: {text!r}")

    print(f"\nfiles, after {time.perf_counter() - start:.0f} s:")
    print(f"  palette (merged, with tokenizer and model card): {out / 'palette'}")
    print(f"  training report (importance, visits, deployed): {out / REPORT}")
    print(f"  evaluation table: {out / 'evaluation' / REPORT_FILES['md']} (and .csv, .json)")
    print(f"  Pareto plot: {out / 'evaluation' / REPORT_FILES['png']}")
    print(f"next: stitched-llama chat {out / 'palette'}")
    return {"before": before, "after": rows, "search": search_rows, "seconds": time.perf_counter() - start}


__all__ = ["FAMILY", "family_anchors", "healing_arguments", "run_demo"]

"""Per-stitch evaluation: exact token-weighted loss, stitch selection, Pareto front, report files, peft models."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_palette
from datasets import Dataset

from stitched_llama.esta import prepare_esta
from stitched_llama.evaluation import evaluate_palette, pareto_front, write_report

# Uneven lengths and prompt tokens masked with -100, so that padding matters and a mean of per-batch means
# (batch_size=2 gives batches of 2, 2 and 1 examples with very different label counts) is not the token mean.
LENGTHS = [(4, 2), (14, 3), (6, 1), (11, 9), (3, 1)]  # (tokens, prompt tokens not scored)


def make_examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in LENGTHS:
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return examples


@pytest.fixture(scope="module")
def palette():
    return build_palette("llama")[0]


def reference_loss(palette, examples, stitch):
    """Token-weighted NLL computed one unpadded example at a time: no batching, no padding involved."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = palette(torch.tensor([e["input_ids"]]), stitch=stitch).logits[0]
            labels = torch.tensor(e["labels"])
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            count += int((labels[1:] != -100).sum())
    return total / count, count


def mean_of_batch_means(palette, examples, stitch, batch_size):
    means = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in chunk])
            mask = torch.tensor([e["attention_mask"] + [0] * (width - len(e["input_ids"])) for e in chunk])
            labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in chunk])
            logits = palette(ids, attention_mask=mask, stitch=stitch).logits
            means.append(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())))
    return sum(means) / len(means)


def test_loss_is_the_exact_token_weighted_mean(palette):
    examples = make_examples()
    dataset = Dataset.from_list(examples)
    last = palette.num_stitches - 1
    rows = evaluate_palette(palette, dataset, stitches=[last, 1], batch_size=2, progress=False)
    assert [r["stitch"] for r in rows] == [1, last]
    for row in rows:
        expected, count = reference_loss(palette, examples, row["stitch"])
        assert row["tokens"] == count == sum(n - p for n, p in LENGTHS)
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        # The test has teeth: averaging batch means would give a visibly different number.
        assert abs(mean_of_batch_means(palette, examples, row["stitch"], 2) - expected) > 1e-3
        cost = palette.config.stitch_cost(row["stitch"])
        assert (row["params"], row["flops_per_token"]) == (cost.params, cost.flops_per_token)
        assert row["layers"] == palette.config.num_layers(row["stitch"])
    assert rows[1]["kind"] == "large anchor"


def test_inputs_without_labels_and_raw_text_score_every_token(palette, tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    id_lists = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3)]
    texts = [tiny_tokenizer.decode(ids) for ids in id_lists]
    from_ids = evaluate_palette(palette, [{"input_ids": ids} for ids in id_lists], stitches=[0], progress=False)
    from_text = evaluate_palette(palette, texts, stitches=[0], tokenizer=tiny_tokenizer, progress=False)
    with_labels = [{"input_ids": ids, "labels": ids} for ids in id_lists]
    expected, count = reference_loss(palette, with_labels, 0)
    for rows in (from_ids, from_text):
        assert rows[0]["tokens"] == count == 4 + 8 + 2
        assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="tokenizer="):
        evaluate_palette(palette, texts, progress=False)


def test_stitch_selection_and_deployed(palette):
    examples = make_examples()[:2]
    last = palette.num_stitches - 1
    palette.config.deployed_stitches = None
    with pytest.raises(ValueError, match="train it with `StitchTrainer`.*stitches='all'"):
        evaluate_palette(palette, examples, stitches="deployed", progress=False)
    with pytest.raises(ValueError, match="'best'"):
        evaluate_palette(palette, examples, stitches="best", progress=False)
    with pytest.raises(ValueError, match="Unknown stitch 99"):
        evaluate_palette(palette, examples, stitches=[99], progress=False)
    try:
        palette.config.deployed_stitches = [last, 0, 2]
        rows = evaluate_palette(palette, examples, stitches="deployed", progress=False)
        assert [r["stitch"] for r in rows] == [0, 2, last]
        assert all(r["deployed"] for r in rows)
        rows = evaluate_palette(palette, examples, stitches=[-1, 1], progress=False)
        assert [(r["stitch"], r["deployed"]) for r in rows] == [(1, False), (last, True)]
    finally:
        palette.config.deployed_stitches = None


def test_pareto_front_by_hand():
    rows = [
        {"stitch": 5, "flops_per_token": 6, "perplexity": 5.0, "params": 1, "loss": 9.0},
        {"stitch": 1, "flops_per_token": 2, "perplexity": 12.0, "params": 2, "loss": 1.0},  # beaten by 0
        {"stitch": 0, "flops_per_token": 1, "perplexity": 10.0, "params": 3, "loss": 2.0},
        {"stitch": 3, "flops_per_token": 3, "perplexity": 9.0, "params": 4, "loss": 3.0},  # beaten by 2 (same cost)
        {"stitch": 2, "flops_per_token": 3, "perplexity": 8.0, "params": 5, "loss": 4.0},
        {"stitch": 4, "flops_per_token": 5, "perplexity": 8.0, "params": 6, "loss": 5.0},  # beaten by 2 (same ppl)
        {"stitch": 6, "flops_per_token": 7, "perplexity": float("nan"), "params": 0, "loss": 0.5},  # left out
    ]
    # Cheapest first: 0 (cost 1), then 2 (cost 3, better than 0), then 5 (cost 6, best perplexity).
    assert pareto_front(rows) == [0, 2, 5]
    # On (params, loss): 5 (params 1, loss 9), 1 (2, 1.0) beats everything costlier, except 6 (0 params, 0.5).
    assert pareto_front(rows, cost_key="params", metric_key="loss") == [6]
    # Equal rows do not dominate each other; rows without `stitch` are named by position.
    assert pareto_front([{"c": 1, "m": 2}, {"c": 1, "m": 2}, {"c": 0, "m": 3}], "c", "m") == [2, 0, 1]
    with pytest.raises(KeyError, match="metric_key="):
        pareto_front(rows, metric_key="accuracy")


def test_report_files(palette, tmp_path):
    last = palette.num_stitches - 1
    palette.config.deployed_stitches = [0, 2, last]
    try:
        rows = evaluate_palette(palette, make_examples(), batch_size=4, output_dir=tmp_path, progress=False)
    finally:
        palette.config.deployed_stitches = None
    assert len(rows) == palette.num_stitches
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    with open(tmp_path / "evaluation.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["stitch"]) for r in table] == list(range(palette.num_stitches))
    assert float(table[1]["loss"]) == pytest.approx(rows[1]["loss"])
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert [r["stitch"] for r in report["stitches"]] == list(range(palette.num_stitches))
    assert report["deployed_stitches"] == [0, 2, last]
    assert report["pareto_front"] == pareto_front(rows)
    assert all(r["pareto"] == (r["stitch"] in report["pareto_front"]) for r in report["stitches"])
    markdown = (tmp_path / "evaluation.md").read_text()
    assert markdown.count("\n") == palette.num_stitches + 2 and "large anchor" in markdown
    # Rows read back from the JSON report can be written again.
    paths = write_report(report["stitches"], tmp_path / "again")
    assert sorted(paths) == ["csv", "json", "md", "png"]


def test_peft_model_matches_palette_and_modes_are_restored():
    palette, _ = build_palette("qwen2")
    examples = make_examples(seed=3)
    before = evaluate_palette(palette, examples, batch_size=3, progress=False)
    model = prepare_esta(palette)
    model.train()
    active = palette.active_stitch
    after = evaluate_palette(model, examples, batch_size=3, progress=False)
    assert all(m.training for m in model.modules())
    assert palette.active_stitch == active
    for b, a in zip(before, after, strict=True):
        assert a["stitch"] == b["stitch"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    # LoRA is applied: moving a LoRA weight changes the result through the peft model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    changed = evaluate_palette(model, examples, stitches=[-1], batch_size=3, progress=False)
    assert changed[0]["loss"] != pytest.approx(after[-1]["loss"], rel=1e-3)

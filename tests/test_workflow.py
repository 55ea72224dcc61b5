"""`train_palette`: train -> deploy -> evaluate -> merge -> save, the one sequence the CLI, demo and example share."""

import json

import torch
from conftest import build_palette, prompt
from peft import PeftModel
from test_trainer import dataset, make_args
from transformers import default_data_collator

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.trainer import REPORT
from stitched_llama.workflow import MERGED_DIR, train_palette


def test_train_palette_deploys_once_merges_and_saves(tmp_path, tiny_tokenizer):
    palette, (small, _) = build_palette("llama")
    deployments = []

    def count_deployments(trainer):
        deploy = trainer.deploy
        trainer.deploy = lambda: deployments.append(1) or deploy()

    result = train_palette(
        palette,
        make_args(tmp_path, max_steps=4, num_deployed_stitches=2),
        dataset(),
        dataset(8, seed=1),
        tokenizer=tiny_tokenizer,
        data_collator=default_data_collator,
        before_training=count_deployments,
    )
    assert deployments == [1] and result.train_output.global_step == 4
    merged = result.palette
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    k = merged.num_stitches
    metrics = {str(i): result.eval_metrics[f"eval_stitch{i}_loss"] for i in range(k)}
    assert {i: row["eval_loss"] for i, row in merged.stitch_report["metrics"].items()} == metrics
    report = json.loads((tmp_path / REPORT).read_text())
    assert report["deployed_stitches"] == merged.config.deployed_stitches
    assert [row["eval_loss"] for row in report["stitches"]] == [metrics[str(i)] for i in range(k)]

    assert result.saved_to == str(tmp_path / MERGED_DIR)
    again = StitchedLlamaForCausalLM.from_pretrained(result.saved_to).eval()
    assert (tmp_path / MERGED_DIR / "tokenizer.json").is_file() and again.stitch_report == merged.stitch_report
    x = prompt()
    with torch.no_grad():
        for stitch in range(k):
            assert torch.equal(again(x, stitch=stitch).logits, merged.eval()(x, stitch=stitch).logits), stitch
        # ESTA trained: the merged palette's small anchor no longer equals the untouched one
        assert not torch.equal(again(x, stitch=0).logits, small(x).logits)


def test_train_palette_without_evaluation_or_save(tmp_path):
    palette, _ = build_palette("llama")
    result = train_palette(palette, make_args(tmp_path, max_steps=2), dataset(), save=False)
    assert result.eval_metrics == {} and result.saved_to is None and not (tmp_path / MERGED_DIR).exists()
    assert result.palette.config.deployed_stitches  # deployment is part of train()

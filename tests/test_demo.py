"""The demo on the built-in family: it runs end to end and what it saves loads back."""

import json

import pytest
import torch

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.demo import FAMILY, run_demo


def test_the_family_is_shipped_with_its_tokenizer_and_text():
    for name in ("small", "large"):
        assert (FAMILY / name / "model.safetensors").is_file() and (FAMILY / name / "tokenizer.json").is_file()
    sizes = sum(p.stat().st_size for p in FAMILY.rglob("*") if p.is_file())
    assert sizes < 20e6  # the budget for committed weights
    assert (FAMILY / "text" / "train.txt").stat().st_size > 100_000


def test_demo_runs_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    result = run_demo(tmp_path, steps=3, heldout_blocks=16, max_new_tokens=4)
    out = capsys.readouterr().out
    for step in ("1/5 anchors", "2/5 search", "3/5 train", "4/5 evaluate", "5/5 generate"):
        assert f"== {step}" in out
    kept = [r["name"] for r in result["search"] if r["kept"]]
    assert [r["name"] for r in result["after"]] == kept and len(kept) >= 3
    assert any(r["kind"] in ("layer skip", "hybrid + skip") for r in result["search"])
    palette = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "palette")
    assert palette.num_stitches == len(kept) and (tmp_path / "palette" / "tokenizer.json").is_file()
    rows = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["stitches"]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in result["after"]])

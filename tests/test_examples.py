"""The example scripts run end to end on the built-in defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from stitched_llama import StitchedLlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def test_train_esta_example_end_to_end(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_esta.py"),
        "--output-dir", str(tmp_path),
        "--max-steps", "12",
        "--per-device-train-batch-size", "8",
        "--learning-rate", "3e-3",
        "--save-steps", "6",
        "--report-to", "none",
        "--use-cpu",
        "--disable-tqdm", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "esta_report.json").read_text())
    assert report["deployed_stitches"][0] == 0
    assert all("eval_loss" in row for row in report["stitches"])
    palette = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "palette")
    assert palette.config.deployed_stitches == report["deployed_stitches"]
    assert not any("lora_" in n for n, _ in palette.named_parameters())
    assert any(
        float(p.detach().abs().sum()) > 0
        for k in range(palette.num_stitches)
        for p in palette.stitch_bias_parameters(k).values()
    )
    assert (tmp_path / "palette" / "tokenizer.json").exists()
    with torch.no_grad():
        out = palette.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    # The saved palette keeps the anchors' EOS: generation ends there or after the 3 tokens asked for.
    eos = palette.generation_config.eos_token_id
    assert eos is not None
    assert out.shape == (1, 6) or (out.shape[1] < 6 and int(out[0, -1]) == eos), out

"""A palette saved by an earlier release (commit e67fa48, before layer skipping and the smaller remote code) still
loads: with this package, and as the remote code it carries. The fixture holds its weights, its own code and the
logits it gave when saved."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from stitched_llama import StitchedLlamaForCausalLM

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "palette-e67fa48"


@torch.no_grad()
def test_an_old_palette_loads_with_todays_package_and_gives_its_logits():
    palette = StitchedLlamaForCausalLM.from_pretrained(FIXTURE).eval()
    saved = torch.load(FIXTURE / "expected_logits.pt")
    assert palette.active_stitch == 1 and palette.config.stitch_bias_targets  # ESTA-trained, biases merged in
    for k, logits in saved["logits"].items():
        torch.testing.assert_close(palette(saved["x"], stitch=k).logits, logits, rtol=1e-5, atol=1e-5)
    assert palette.config.stitch_kind(0) == "small anchor" and palette.config.stitch_name(1) == "(1, 2)"


def test_an_old_palette_loads_as_its_own_remote_code(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["stitched_llama"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(FIXTURE)!r}, trust_remote_code=True).eval()
        saved = torch.load({str(FIXTURE / "expected_logits.pt")!r})
        with torch.no_grad():
            for k, logits in saved["logits"].items():
                torch.testing.assert_close(model(saved["x"], stitch=k).logits, logits, rtol=1e-5, atol=1e-5)
        print("old-remote-ok")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "old-remote-ok" in result.stdout

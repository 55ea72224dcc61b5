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


def test_measurements_an_old_config_held_move_to_the_report(tmp_path):
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "config.json").read_text())
    # What the trainer and `evaluate` wrote into the config before the report file existed.
    config |= {"stitch_metrics": {"1": {"eval_loss": 2.5}}, "stitch_importance": [0.1, 0.7, 0.2]}
    (folder / "config.json").write_text(json.dumps(config))
    palette = StitchedLlamaForCausalLM.from_pretrained(folder)
    assert palette.stitch_report == {"metrics": {"1": {"eval_loss": 2.5}}, "importance": [0.1, 0.7, 0.2]}
    palette.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert not {"stitch_metrics", "stitch_importance", "stitch_profile"} & set(resaved)
    assert json.loads((tmp_path / "resaved" / "stitch_report.json").read_text()) == palette.stitch_report


@torch.no_grad()
def test_an_old_palettes_stitch_biases_are_read_and_saved_as_layers(tmp_path):
    from safetensors import safe_open

    with safe_open(FIXTURE / "model.safetensors", framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys() if k.startswith("stitch_biases.")}
    assert old and any(t.abs().sum() > 0 for t in old.values())  # trained biases, so the logits above need them
    palette = StitchedLlamaForCausalLM.from_pretrained(FIXTURE).eval()
    for key, tensor in old.items():
        _, stitch, linear = key.split(".", 2)
        assert torch.equal(palette.stitch_bias_parameters(int(stitch))[linear.replace("-", ".")], tensor), key
    palette.save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("stitch_biases.") for k in keys)
    assert sum(".stitch_bias." in k for k in keys) == len(old)
    saved = torch.load(FIXTURE / "expected_logits.pt")
    resaved = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    for k, logits in saved["logits"].items():
        torch.testing.assert_close(resaved(saved["x"], stitch=k).logits, logits, rtol=1e-5, atol=1e-5)


def test_an_old_bias_of_a_linear_the_palette_lacks_is_an_error(tmp_path):
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    shutil.copytree(FIXTURE, tmp_path / "palette")
    weights = load_file(tmp_path / "palette" / "model.safetensors")
    weights["stitch_biases.0.large-model-layers-99-self_attn-q_proj"] = torch.ones(4)
    save_file(weights, tmp_path / "palette" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"unexpected keys: large\.model\.layers\.99\.self_attn\.q_proj\.stitch_bias\.0"):
        StitchedLlamaForCausalLM.from_pretrained(tmp_path / "palette")

"""Deploying a palette: export one stitch, budgets, profiling, stitch views, pipelines and the model card."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, build_palette
from transformers import AutoModelForCausalLM, TextStreamer, pipeline

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.esta import EstaConfig, prepare_esta

X = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def trained(name="llama", targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0):
    """A palette with non-zero LoRA and stitch biases, as after training (LoRA still attached)."""
    palette, _ = build_palette(name)
    model = prepare_esta(palette, EstaConfig(target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return palette, model


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


@pytest.mark.parametrize(
    "name, targets, anchor_class",
    [
        ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), "LlamaForCausalLM"),
        ("qwen2", ("q_proj", "k_proj", "v_proj"), "Qwen2ForCausalLM"),
        ("qwen2", ("q_proj", "o_proj"), "StitchedLlamaForCausalLM"),  # Qwen2 has no o_proj bias slot
    ],
)
@torch.no_grad()
def test_exported_stitch_gives_the_same_logits(tmp_path, name, targets, anchor_class):
    palette, model = trained(name, targets)
    expected = [model(input_ids=X, stitch=k).logits for k in range(palette.num_stitches)]
    palette.save_pretrained(tmp_path / "palette")
    full = folder_bytes(tmp_path / "palette")
    for k in range(palette.num_stitches):
        out = tmp_path / f"stitch{k}"
        exported_class = palette.export_stitch(k, out)
        anchor = k in (0, palette.num_stitches - 1)
        assert exported_class == (anchor_class if anchor else "StitchedLlamaForCausalLM")
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert type(loaded).__name__ == exported_class
        assert torch.allclose(loaded(X).logits, expected[k], atol=1e-5), k
        assert folder_bytes(out) < full
        if exported_class == "StitchedLlamaForCausalLM":
            assert loaded.config.slim and len(loaded.config.stitches) == 1
    # the LoRA was merged for the export only
    for k in range(palette.num_stitches):
        assert torch.equal(model(input_ids=X, stitch=k).logits, expected[k])


@torch.no_grad()
def test_exports_load_where_the_package_is_missing(tmp_path):
    palette, model = trained("llama")
    palette.export_stitch(0, tmp_path / "anchor")
    palette.export_stitch(2, tmp_path / "hybrid")
    assert "auto_map" not in json.loads((tmp_path / "anchor" / "config.json").read_text())
    expected = {"anchor": model(input_ids=X, stitch=0).logits, "hybrid": model(input_ids=X, stitch=2).logits}
    torch.save({"x": X, **expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["stitched_llama"] = None
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "expected.pt")!r})
        anchor = AutoModelForCausalLM.from_pretrained({str(tmp_path / "anchor")!r})
        hybrid = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hybrid")!r}, trust_remote_code=True)
        with torch.no_grad():
            assert torch.allclose(anchor(data["x"]).logits, data["anchor"], atol=1e-5)
            assert torch.allclose(hybrid(data["x"]).logits, data["hybrid"], atol=1e-5)
        print(type(anchor).__name__, type(hybrid).__module__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("LlamaForCausalLM transformers_modules")


def test_export_of_an_unknown_stitch_is_an_error(tmp_path):
    palette, _ = build_palette("llama")
    with pytest.raises(ValueError, match="Unknown stitch 12"):
        palette.export_stitch(12, tmp_path)


def test_select_stitch_under_budgets():
    palette, _ = build_palette("llama")
    costs = [palette.config.stitch_cost(k) for k in range(palette.num_stitches)]
    # no metrics, no importance: the most expensive stitch that fits
    assert palette.select_stitch() == palette.num_stitches - 1
    limit = costs[2].params
    fitting = [k for k, c in enumerate(costs) if c.params <= limit]
    assert palette.select_stitch(max_params=limit) == max(fitting, key=lambda k: costs[k].flops_per_token)
    assert palette.select_stitch(max_flops=f"{costs[1].flops_per_token / 1e3}K") in {0, 1}
    palette.update_stitch_report(importance=[5.0, 1.0, 9.0, 0.0, 0.0])
    assert palette.select_stitch() == 2
    metrics = {str(k): {"eval_loss": 3.0 - 0.1 * k} for k in range(palette.num_stitches)}
    metrics["1"]["eval_loss"] = 0.5
    palette.update_stitch_report(metrics=metrics)
    assert palette.select_stitch() == 1
    assert palette.select_stitch(max_params=costs[0].params) == 0


def test_the_report_travels_next_to_the_weights_not_in_the_config(tmp_path):
    palette, _ = build_palette("llama")
    palette.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "stitch_report.json").exists()  # nothing measured, nothing written
    metrics = {str(k): {"eval_loss": 1.0 + k} for k in range(palette.num_stitches)}
    palette.update_stitch_report(metrics=metrics, importance=[0.5] * palette.num_stitches)
    palette.save_pretrained(tmp_path / "measured")
    again = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "measured")
    assert again.stitch_report == {"metrics": metrics, "importance": [0.5] * palette.num_stitches}
    assert StitchedLlamaForCausalLM.from_pretrained(tmp_path / "plain").stitch_report == {}
    with pytest.raises(ValueError, match="stitches \\['9'\\].*key the metrics by stitch index"):
        palette.update_stitch_report(metrics={"9": {"eval_loss": 1.0}})
    with pytest.raises(ValueError, match="2 importance scores .* one score per stitch"):
        palette.update_stitch_report(importance=[1.0, 2.0])


@pytest.mark.parametrize(
    "budget, error",
    [
        (dict(max_params=-5), "must be positive"),
        (dict(max_flops="12 parsecs"), "unknown unit"),
        (dict(max_memory_mb="2 GHz"), "unknown unit"),
        (dict(max_params=10), "cheapest, stitch 0, needs"),
        (dict(max_latency_ms=5), "profile_stitches"),
        (dict(max_params=[1]), "must be a number"),
    ],
)
def test_bad_budgets_are_clear_errors(budget, error):
    palette, _ = build_palette("llama")
    with pytest.raises((ValueError, TypeError), match=error):
        palette.select_stitch(**budget)


def test_profile_is_stored_and_travels(tmp_path):
    palette, _ = build_palette("llama")
    profile = palette.profile_stitches(prompt_length=8, new_tokens=2, repeats=1)
    rows = profile["stitches"]
    assert set(rows) == {str(k) for k in range(palette.num_stitches)}
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["memory_mb"] > 0 for r in rows.values())
    # memory on CPU counts the weights the stitch runs: the large anchor runs more than the small one
    assert rows[str(palette.num_stitches - 1)]["memory_mb"] > rows["0"]["memory_mb"]
    slowest = max(rows.values(), key=lambda r: r["decode_ms_per_token"])["decode_ms_per_token"]
    assert palette.select_stitch(max_latency_ms=slowest * 1.01) == palette.num_stitches - 1
    palette.save_pretrained(tmp_path)
    again = StitchedLlamaForCausalLM.from_pretrained(tmp_path)
    assert again.stitch_report["profile"]["stitches"] == rows
    assert "stitch_profile" not in json.loads((tmp_path / "config.json").read_text())  # measurements, not the model
    assert again.select_stitch(max_memory_mb=rows["0"]["memory_mb"]) == 0


@torch.no_grad()
def test_self_speculative_decoding_keeps_greedy_output():
    palette, model = trained("qwen2")
    x = X[:1]
    for target, draft in ((palette.num_stitches - 1, 0), (3, 1)):
        palette.set_stitch(target)
        view = palette.stitch_view(draft)
        assert view.active_stitch == draft and palette.active_stitch == target
        assert view.small.model.embed_tokens.weight.data_ptr() == palette.small.model.embed_tokens.weight.data_ptr()
        plain = palette.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0)
        speculative = palette.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, assistant_model=view)
        assert torch.equal(plain, speculative), (target, draft)


@torch.no_grad()
def test_pipeline_and_streamer(tiny_tokenizer, capsys):
    palette, _ = build_palette("llama")
    generator = pipeline("text-generation", model=palette, tokenizer=tiny_tokenizer)
    out = generator("w1 w2 w3", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w1 w2 w3")
    ids = tiny_tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    expected = palette.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    palette.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, streamer=TextStreamer(tiny_tokenizer))
    printed = capsys.readouterr().out.strip()
    assert printed == tiny_tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_model_card_lists_stitches_and_is_pushed(tmp_path, monkeypatch):
    import huggingface_hub

    palette, _ = build_palette("llama")
    palette.config.deployed_stitches = [0, 2, palette.num_stitches - 1]
    palette.update_stitch_report(metrics={str(k): {"eval_perplexity": 10.0 - k} for k in range(palette.num_stitches)})
    palette.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| 2 | (1, 2) | hybrid |" in card and "8.00 | yes |" in card
    assert 'select_stitch(max_params="1B")' in card

    sent = {}
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})()
    )

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            if op.path_in_repo == "README.md":
                sent["card"] = open(op.path_or_fileobj).read()
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    palette.push_to_hub("team/palette")
    assert "Stitched palette" in sent["card"] and 'from_pretrained("team/palette"' in sent["card"]


def test_a_palette_with_a_missing_tensor_refuses_to_load(tmp_path):
    from safetensors.torch import load_file, save_file

    palette, _ = build_palette("llama")
    palette.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = next(key for key in weights if key.startswith("stitch_layers."))
    del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=rf"missing keys: .*{name}"):
        StitchedLlamaForCausalLM.from_pretrained(tmp_path)


def test_a_slim_export_keeps_its_stitch_measurements(tmp_path):
    palette, _ = build_palette("llama")
    k = 2  # a hybrid: exported as a slim palette, which has a report of its own
    palette.update_stitch_report(
        metrics={str(s): {"eval_loss": 1.0 + s} for s in range(palette.num_stitches)},
        importance=[0.1 * s for s in range(palette.num_stitches)],
        profile={"device": "cpu", "stitches": {str(s): {"prefill_ms": 10.0 + s} for s in range(palette.num_stitches)}},
    )
    assert palette.export_stitch(k, tmp_path / "hybrid") == "StitchedLlamaForCausalLM"
    loaded = StitchedLlamaForCausalLM.from_pretrained(tmp_path / "hybrid")
    assert loaded.stitch_report == {
        "metrics": {"0": {"eval_loss": 3.0}},
        "importance": [pytest.approx(0.2)],
        "profile": {"device": "cpu", "stitches": {"0": {"prefill_ms": 12.0}}},
    }

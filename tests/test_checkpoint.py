import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, build_palette, make_anchor
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM

X = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def saved_keys(folder):
    keys = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                keys |= set(f.keys())
    return keys


@torch.no_grad()
def test_save_and_load_round_trip_exactly(tmp_path, pair_name):
    palette, _ = build_palette(pair_name)
    palette.set_stitch(1)
    palette.save_pretrained(tmp_path)
    loaded = StitchedLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.stitches == palette.config.stitches
    assert loaded.active_stitch == 1
    for k in range(palette.num_stitches):
        assert torch.equal(loaded(X, stitch=k).logits, palette(X, stitch=k).logits), f"stitch {k}"


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path):
    palette, _ = build_palette("llama")  # the small llama anchor ties its embeddings
    palette.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert "small.model.embed_tokens.weight" in keys
    assert "small.lm_head.weight" not in keys
    assert "large.lm_head.weight" in keys
    loaded = StitchedLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.small.lm_head.weight is loaded.small.model.embed_tokens.weight
    assert loaded.large.lm_head.weight is not loaded.large.model.embed_tokens.weight


def test_import_registers_auto_classes(tmp_path):
    palette, _ = build_palette("qwen2")
    palette.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), StitchedLlamaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, StitchedLlamaForCausalLM)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "stitched_llama"


def test_tokenizer_is_saved_alongside(tmp_path, tiny_tokenizer):
    small, large = make_anchor(), make_anchor(hidden=48, layers=3, heads=4, kv_heads=2, seed=1)
    texts = [" ".join(f"w{(i * 7 + t) % 90}" for t in range(40)) for i in range(12)]
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, calibration=texts, tokenizer=tiny_tokenizer)
    palette.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("w1 w2 w3")["input_ids"] == tiny_tokenizer("w1 w2 w3")["input_ids"]


@torch.no_grad()
def test_loads_with_remote_code_where_the_package_cannot_be_imported(tmp_path):
    palette, _ = build_palette("qwen2")
    folder = tmp_path / "palette"
    palette.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("StitchedLlamaForCausalLM")
    # Only what runs the palette travels: building, export and the model card stay in the package.
    assert {name for name in os.listdir(folder) if name.endswith(".py")} == {
        "modeling_stitched_llama.py",
        "configuration_stitched_llama.py",
    }
    expected = {k: palette(X, stitch=k).logits for k in range(palette.num_stitches)}
    torch.save({"x": X, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["stitched_llama"] = None  # any import of the package now fails
        try:
            import stitched_llama  # noqa: F401
            raise SystemExit("stitched_llama is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            for k, logits in data["expected"].items():
                assert torch.equal(model(data["x"], stitch=k).logits, logits), k
            again = model.generate(data["x"], max_new_tokens=3, do_sample=False, stitch=1)
            assert again.shape[1] == data["x"].shape[1] + 3
        model.save_pretrained({str(tmp_path / "resaved")!r})  # without the package: saved, with no model card
        try:
            model.export_stitch(1, {str(tmp_path / "export")!r})
            raise SystemExit("export worked without the package")
        except ImportError as error:
            assert "pip install stitched-llama" in str(error), error
        print("remote-ok")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok" in result.stdout


def test_push_to_hub_sends_the_palette(monkeypatch, tiny_tokenizer):
    import huggingface_hub

    sent = {}

    class Repo:
        repo_id = "team/palette"

    def create_repo(self, repo_id, **kwargs):
        sent["repo"] = repo_id
        return Repo()

    def create_commit(self, repo_id, operations, **kwargs):
        sent["files"] = {op.path_in_repo: os.path.getsize(op.path_or_fileobj) for op in operations}
        sent["config"] = json.loads(
            open(next(op.path_or_fileobj for op in operations if op.path_in_repo == "config.json")).read()
        )
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    palette, _ = build_palette("llama")
    palette.tokenizer = tiny_tokenizer
    palette.push_to_hub("team/palette")
    files = sent["files"]
    assert sent["repo"] == "team/palette"
    assert "model.safetensors" in files and files["model.safetensors"] > 0
    assert {"config.json", "modeling_stitched_llama.py", "configuration_stitched_llama.py", "tokenizer.json"} <= set(
        files
    )
    assert sent["config"]["model_type"] == "stitched_llama"


def test_missing_shard_is_a_clear_error(tmp_path):
    palette, _ = build_palette("llama")
    palette.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    with pytest.raises(Exception, match=shards[-1].replace(".", r"\.")):
        StitchedLlamaForCausalLM.from_pretrained(tmp_path)


def test_config_of_another_model_type_is_rejected(tmp_path):
    make_anchor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'.*from_anchors"):
        StitchedLlamaForCausalLM.from_pretrained(tmp_path)

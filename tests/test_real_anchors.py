"""The real-anchor pipeline end to end on a tiny budget: Qwen2.5-Coder 0.5B (small) -> 1.5B (large).

Needs the converted anchors and data of `benchmarks/prepare_anchors.py` and `benchmarks/prepare_data.py` (cache dir
`$STITCHED_LLAMA_CACHE` or `~/.cache/stitched_llama`); skipped when they are absent. Marked `slow` (deselected by
default): run with `pytest -m slow tests/test_real_anchors.py`. About 10 GB of RAM; a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("STITCHED_LLAMA_CACHE") or "~/.cache/stitched_llama").expanduser()
SMALL = CACHE / "qwen2.5-coder-0.5b-instruct"
LARGE = CACHE / "qwen2.5-coder-1.5b-instruct"
CALIB = CACHE / "text" / "python_docs_calib.txt"
HELDOUT = CACHE / "text" / "python_docs_heldout.txt"
WORDNET = CACHE / "wordnet" / "train.jsonl"
HYBRIDS = [(12, 14), (20, 23)]  # from the default palette: same relative depth in both anchors


@pytest.fixture(scope="module")
def real():
    missing = [str(p) for p in (SMALL / "model.safetensors", LARGE / "model.safetensors", CALIB, HELDOUT, WORDNET)]
    missing = [p for p in missing if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"real anchors/data absent ({', '.join(missing)}): run benchmarks/prepare_anchors.py and "
            "benchmarks/prepare_data.py first"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stitched_llama import StitchedLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SMALL)
    ids = tokenizer(CALIB.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    # The fit needs more usable tokens than the small hidden size + 1 (897): 4 windows x 239 predicted positions.
    calibration = torch.tensor(ids[: 4 * 240]).view(4, 240)
    probe = torch.tensor([ids[-40:]])
    heldout_ids = tokenizer(HELDOUT.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    heldout = torch.tensor(heldout_ids[: 2 * 128]).view(2, 128)

    # Reference logits from the plain models, loaded on their own and freed before the palette is built.
    reference = {}
    for name, path in (("small", SMALL), ("large", LARGE)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            reference[name] = model(probe).logits
        del model

    palette = StitchedLlamaForCausalLM.from_anchors(
        SMALL,
        LARGE,
        stitches=HYBRIDS,
        calibration=calibration,
        tokenizer=tokenizer,
        dtype=torch.float32,
        max_length=240,
    ).eval()
    return {"palette": palette, "tokenizer": tokenizer, "probe": probe, "reference": reference, "heldout": heldout}


@torch.no_grad()
def _perplexity(palette, ids: torch.LongTensor, stitch: int) -> float:
    logits = palette(input_ids=ids, stitch=stitch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


def test_palette_shape(real):
    palette = real["palette"]
    assert [tuple(s) for s in palette.config.stitches] == [(24, 28), *HYBRIDS[::-1], (0, 0)]
    flops = [row["flops_per_token"] for row in palette.stitch_table()]
    assert flops == sorted(flops)


@torch.no_grad()
def test_anchor_stitches_reproduce_plain_models(real):
    palette, probe = real["palette"], real["probe"]
    small = palette(input_ids=probe, stitch=0, use_cache=False).logits
    large = palette(input_ids=probe, stitch=-1, use_cache=False).logits
    torch.testing.assert_close(small, real["reference"]["small"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(large, real["reference"]["large"], rtol=1e-4, atol=1e-4)


def test_least_squares_hybrids_are_finite_and_better_than_chance(real):
    palette = real["palette"]
    errors = palette.stitch_fit_errors
    assert set(errors) == {str(n) for n, _ in HYBRIDS}
    assert all(0.0 <= e < 1.0 for e in errors.values()), errors
    vocab = palette.config.vocab_size
    for k in range(palette.num_stitches):
        ppl = _perplexity(palette, real["heldout"], k)
        assert math.isfinite(ppl) and ppl < vocab / 10, (k, ppl)


def test_two_esta_training_steps(real, tmp_path):
    """Runs last: it wraps the shared palette in peft."""
    from datasets import Dataset

    from stitched_llama.data import collate_fn, tokenize_instructions
    from stitched_llama.esta import stitch_bias_norms
    from stitched_llama.trainer import StitchTrainer, StitchTrainingArguments

    palette, tokenizer = real["palette"], real["tokenizer"]
    with open(WORDNET, encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(4)]
    train = tokenize_instructions(Dataset.from_list(records), tokenizer, max_length=64)
    frozen = palette.large.model.layers[20].self_attn.q_proj.weight.detach().clone()
    args = StitchTrainingArguments(
        output_dir=str(tmp_path),
        method="esta",
        sampling="importance",
        max_steps=2,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = StitchTrainer(model=palette, args=args, train_dataset=train, data_collator=collate_fn(tokenizer))
    output = trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.stitch_history == [0, 1]  # warm-up visits the stitches in turn
    assert math.isfinite(output.training_loss)
    torch.testing.assert_close(palette.large.model.layers[20].self_attn.q_proj.base_layer.weight, frozen)
    norms = stitch_bias_norms(trainer.model)
    assert norms[0] > 0 and norms[1] > 0 and norms[2] == 0 and norms[3] == 0, norms

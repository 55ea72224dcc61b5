"""The deployment walkthrough behind docs/deploying.md: stitch table, budgets, exports and their sizes.

python benchmarks/deploy_walkthrough.py OUTPUT_DIR     # OUTPUT_DIR of examples/train_esta.py
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stitched_llama  # noqa: F401  (registers the palette classes with the Auto classes)

ROOT = sys.argv[1] if len(sys.argv) > 1 else "outputs/esta"

palette = AutoModelForCausalLM.from_pretrained(f"{ROOT}/palette")
tok = AutoTokenizer.from_pretrained(f"{ROOT}/palette")
print(palette.format_stitch_table())
print("deployed:", palette.config.deployed_stitches)
print("select_stitch(max_params='0.8M') ->", palette.select_stitch(max_params="0.8M"))
print("select_stitch(max_flops='1.5M') ->", palette.select_stitch(max_flops="1.5M"))
try:
    palette.select_stitch(max_params="10K")
except ValueError as e:
    print("ValueError:", e)


def size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


full = size(f"{ROOT}/palette")
print(f"full palette: {full / 1e6:.2f} MB")
for k in (0, 4, 8):
    out = f"{ROOT}/stitch{k}"
    cls = palette.export_stitch(k, out)
    e = AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        diff = (e(x).logits - palette(x, stitch=k).logits).abs().max().item()
    print(
        f"stitch {k}: {cls}, {size(out) / 1e6:.2f} MB ({100 * size(out) / full:.0f}% of the palette), max |logit diff| {diff:.1e}"
    )

"""Measured Pareto fronts of a real palette: Qwen2.5-Coder 0.5B (small) and 1.5B (large), before and after tuning.

    # reduced setting: CPU, fp32, anchors + 5 hybrids, 40 steps per method (see settings.SETTINGS["reduced"])
    nice -n 10 python -m benchmarks.bench_pareto --setting reduced --out docs/results
    # full setting: GPU, bf16 autocast, every stitch of the default palette, 1000 steps per method
    python -m benchmarks.bench_pareto --setting full --device cuda --out docs/results
    # smoke: the built-in family (stitched_llama/assets/family), a few steps: checks the code paths, measures nothing
    python -m benchmarks.bench_pareto --setting smoke --out /tmp/pareto-smoke --phases init,diag-pos0

`python benchmarks/bench_pareto ...` (the folder as a path) works too. Anchors, WordNet instructions and held-out
text come from `benchmarks/prepare_anchors.py` and `benchmarks/prepare_data.py` (cache dir: `--cache-dir`,
`$STITCHED_LLAMA_CACHE` or `~/.cache/stitched_llama`); `--anchors family` takes the anchors and text from the
built-in family instead (WordNet still from the cache).

Phases (`phases.py`, `diagnostics.py`), each run in its own subprocess (so its memory peak is its own) and skipped
when its JSON exists (`--force` reruns):

- `init`: `StitchedLlamaForCausalLM.from_anchors` with least-squares init on python_docs_calib; per-stitch
  perplexity on python_docs_heldout; WordNet test loss / perplexity and greedy-generation token F1 of the untuned
  palette; chat transcripts before tuning.
- `esta-importance`, `esta-uniform`, `snnet-full`: the same palette (stitching layers reloaded, not refitted),
  trained for the same number of steps on the same WordNet train examples in the same order, then evaluated like
  `init`. Records trainable parameters, peak memory and time per step.
- `diag-pos0`, `diag-sink` (optional): diagnostics of the least-squares stitch, on the anchors' states as
  `stitched_llama.stitch_init.capture_anchor_states` gives them.
- `report` (`report.py`): `pareto_<setting>.json`, `pareto_<setting>.png`, `pareto.md` and `transcripts.md` under
  `--out`.

SN-Net direct adaptation (`snnet-full`) trains every weight of both anchors (2.1B parameters). AdamW in fp32 needs
16 bytes per parameter (weights, gradients, two moments), about 34 GB: more than a 24 GB CPU machine has. The
reduced setting therefore runs it with `--snnet-optimizer adafactor-fused` (default there): Adafactor
(factored second moments, no first moment, update clipping 1.0) applied to each parameter as soon as its gradient
is complete during backward, then the gradient is freed, so no full set of gradients or moments ever exists. This
is SN-Net's trainable set and sampling with a memory-light optimizer, not SN-Net's AdamW; the report says so and
also gives AdamW's analytic memory. The full setting uses AdamW.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any submodule imports transformers

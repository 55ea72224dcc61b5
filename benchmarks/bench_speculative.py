"""Self-speculative decoding: a cheap stitch drafts for an expensive one, sharing the palette's weights.

    python benchmarks/bench_speculative.py --palette outputs/demo/palette --target -1 --drafts 0,2
    python benchmarks/bench_speculative.py --small ~/.cache/stitched_llama/qwen2.5-coder-0.5b-instruct \
        --large ~/.cache/stitched_llama/qwen2.5-coder-1.5b-instruct --target -1 --drafts 0

For every draft stitch, greedy `generate(assistant_model=palette.stitch_view(draft))` runs side by side with plain
greedy generation of the target stitch on the same prompts, on chat prompts and on raw code to continue. When the
target is the large anchor, the baseline runs too: the plain small anchor drafting for the plain large one
(`large.generate(assistant_model=small)`, Transformers' own assisted decoding, the same weights). Reported: whether the outputs are identical (they
must be), the acceptance rate (accepted draft tokens / drafted tokens, counted from the forward passes of each
model) and the speed-up in wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoTokenizer

from stitched_llama import StitchedLlamaForCausalLM

PROMPTS = {
    # chat: instructions in the tokenizer's chat template
    "chat": [
        'Define the word "harbor".',
        "Write a Python function that returns the n-th Fibonacci number.",
        "What is the capital of France?",
        "Explain what a list comprehension is in Python.",
    ],
    # code: raw source to continue, no template (where drafting usually pays most)
    "code": [
        "def fibonacci(n: int) -> int:\n    ",
        "import json\n\n\ndef load_config(path):\n    ",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
        "def quicksort(values):\n    if len(values) <= 1:\n        return values\n",
    ],
}


def count_forward_calls(model: torch.nn.Module, counts: dict, key) -> None:
    """Count forward passes of `model` under `counts[key]` (a palette's: under the stitch each pass runs)."""

    def hook(module, args, kwargs):
        k = key
        if k is None:
            k = kwargs.get("stitch")
            k = module.active_stitch if k is None else k
        counts[k] = counts.get(k, 0) + 1

    model.register_forward_pre_hook(hook, with_kwargs=True)


def encode(tokenizer, kind: str, prompt: str) -> dict:
    if kind == "chat" and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


def measure(target, draft, target_key, draft_key, counts, tokenizer, kind, args) -> dict:
    """Plain greedy generation of `target` against the same with `assistant_model=draft`, on one prompt set."""
    plain_times, spec_times, identical = [], [], True
    drafted = accepted = 0
    for prompt in PROMPTS[kind]:
        inputs = encode(tokenizer, kind, prompt)
        kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain = target.generate(**inputs, **kwargs)
            plain_times.append(time.perf_counter() - start)
            counts.clear()
            start = time.perf_counter()
            spec = target.generate(**inputs, **kwargs, assistant_model=draft)
            spec_times.append(time.perf_counter() - start)
            identical &= torch.equal(plain, spec)
            new = spec.shape[-1] - inputs["input_ids"].shape[-1]
            # each verification pass yields its accepted drafts plus one token of the target's own
            drafted += counts.get(draft_key, 0)
            accepted += max(new - counts.get(target_key, 0), 0)
    return {
        "prompts": kind,
        "identical_greedy_output": identical,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "plain_s": statistics.median(plain_times),
        "speculative_s": statistics.median(spec_times),
        "speed_up": statistics.median(plain_times) / statistics.median(spec_times),
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--palette", help="a saved palette folder")
    parser.add_argument("--small", help="small anchor folder (with --large: a palette of the two anchors)")
    parser.add_argument("--large")
    parser.add_argument("--target", type=int, default=-1, help="stitch that must produce the output")
    parser.add_argument("--drafts", default="0", help="comma-separated draft stitches")
    parser.add_argument("--prompts", default="chat,code", help="prompt sets: chat, code")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.palette:
        palette = StitchedLlamaForCausalLM.from_pretrained(args.palette, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(
            args.palette if os.path.isfile(f"{args.palette}/tokenizer.json") else args.small
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.small)
        small_layers = json.load(open(f"{args.small}/config.json"))["num_hidden_layers"]
        large_layers = json.load(open(f"{args.large}/config.json"))["num_hidden_layers"]
        # only the two anchors: no stitching layer to fit
        palette = StitchedLlamaForCausalLM.from_anchors(args.small, args.large, stitches=[(small_layers, large_layers)])
    palette.eval()
    counts: dict = {}
    count_forward_calls(palette, counts, None)
    palette.set_stitch(args.target)
    target = palette.active_stitch
    pairs = [
        (f"stitch {d} ({palette.config.stitch_name(d)})", palette, palette.stitch_view(d), target, d)
        for d in (palette.config.resolve_stitch(int(d)) for d in args.drafts.split(","))
    ]
    if palette.config.stitch_kind(target) == "large anchor" and not palette.config.stitch_bias_targets:
        # The baseline: the plain 0.5B model drafting for the plain 1.5B one, as transformers users do it today. The
        # palette holds its anchors whole, so these are the same weights, with no palette code on the path.
        count_forward_calls(palette.small, counts, "small")
        count_forward_calls(palette.large, counts, "large")
        pairs.append(("plain small anchor (baseline)", palette.large, palette.small, "large", "small"))
    rows = []
    for kind in args.prompts.split(","):
        for label, target_model, draft_model, target_key, draft_key in pairs:
            row = measure(target_model, draft_model, target_key, draft_key, counts, tokenizer, kind, args)
            rows.append({"target": palette.config.stitch_name(target), "draft": label, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"threads={torch.get_num_threads()} new_tokens={args.new_tokens} repeats={args.repeats} "
        f"prompts per set={len(PROMPTS['chat'])}"
    )
    print("| prompts | target | draft | identical | acceptance | plain s | speculative s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prompts']} | {r['target']} | {r['draft']} | {r['identical_greedy_output']} | "
            f"{r['acceptance_rate']:.2f} | {r['plain_s']:.2f} | {r['speculative_s']:.2f} | {r['speed_up']:.2f}x |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

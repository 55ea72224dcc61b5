"""Self-speculative decoding: a cheap stitch drafts for an expensive one, sharing the palette's weights.

    python benchmarks/bench_speculative.py --palette outputs/demo/palette --target -1 --drafts 0,2
    python benchmarks/bench_speculative.py --small ~/.cache/stitched_llama/qwen2.5-coder-0.5b-instruct \
        --large ~/.cache/stitched_llama/qwen2.5-coder-1.5b-instruct --target -1 --drafts 0

For every draft stitch, greedy `generate(assistant_model=palette.stitch_view(draft))` runs side by side with plain
greedy generation of the target stitch on the same prompts. Reported: whether the outputs are identical (they
must be), the acceptance rate (accepted draft tokens / drafted tokens, counted from the forward passes of each
model) and the speed-up in wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from stitched_llama import StitchedLlamaForCausalLM

PROMPTS = [
    'Define the word "harbor".',
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France?",
    "Explain what a list comprehension is in Python.",
]


def count_forward_tokens(model: StitchedLlamaForCausalLM, counts: dict) -> None:
    """Count, per stitch, forward passes and the tokens each one fed."""

    def hook(module, args, kwargs):
        stitch = kwargs.get("stitch")
        stitch = module.active_stitch if stitch is None else stitch
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts.setdefault(stitch, [0, 0])
        counts[stitch][0] += 1
        counts[stitch][1] += 0 if ids is None else ids.shape[-1]

    model.register_forward_pre_hook(hook, with_kwargs=True)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--palette", help="a saved palette folder")
    parser.add_argument("--small", help="small anchor folder (with --large: a palette of the two anchors)")
    parser.add_argument("--large")
    parser.add_argument("--target", type=int, default=-1, help="stitch that must produce the output")
    parser.add_argument("--drafts", default="0", help="comma-separated draft stitches")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()

    if args.palette:
        palette = StitchedLlamaForCausalLM.from_pretrained(args.palette)
        tokenizer = AutoTokenizer.from_pretrained(args.palette)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.small)
        small_layers = json.load(open(f"{args.small}/config.json"))["num_hidden_layers"]
        large_layers = json.load(open(f"{args.large}/config.json"))["num_hidden_layers"]
        # only the two anchors: no stitching layer to fit
        palette = StitchedLlamaForCausalLM.from_anchors(args.small, args.large, stitches=[(small_layers, large_layers)])
    palette.eval()
    counts: dict = {}
    count_forward_tokens(palette, counts)
    palette.set_stitch(args.target)
    target = palette.active_stitch
    rows = []
    for draft in [int(d) for d in args.drafts.split(",")]:
        view = palette.stitch_view(draft)
        plain_times, spec_times, identical = [], [], True
        drafted = accepted = 0
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            if tokenizer.chat_template:
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tokenizer(prompt, return_tensors="pt")
            kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            for _ in range(args.repeats):
                start = time.perf_counter()
                plain = palette.generate(**inputs, **kwargs)
                plain_times.append(time.perf_counter() - start)
                counts.clear()
                start = time.perf_counter()
                spec = palette.generate(**inputs, **kwargs, assistant_model=view)
                spec_times.append(time.perf_counter() - start)
                identical &= torch.equal(plain, spec)
                new = spec.shape[-1] - inputs["input_ids"].shape[-1]
                verify_calls = counts.get(target, [0, 0])[0]
                draft_calls = counts.get(draft, [0, 0])[0]
                # each verification pass yields its accepted drafts plus one token of the target's own
                drafted += draft_calls
                accepted += max(new - verify_calls, 0)
        rows.append(
            {
                "target": target,
                "draft": draft,
                "identical_greedy_output": identical,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "plain_s": statistics.median(plain_times),
                "speculative_s": statistics.median(spec_times),
                "speed_up": statistics.median(plain_times) / statistics.median(spec_times),
            }
        )
    print(
        f"threads={torch.get_num_threads()} new_tokens={args.new_tokens} prompts={len(PROMPTS)} repeats={args.repeats}"
    )
    print("| target | draft | identical | acceptance | plain s | speculative s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['target']} | {r['draft']} | {r['identical_greedy_output']} | {r['acceptance_rate']:.2f} | "
            f"{r['plain_s']:.2f} | {r['speculative_s']:.2f} | {r['speed_up']:.2f}x |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

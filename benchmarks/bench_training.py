"""Cost of fine-tuning a whole palette: ESTA against SN-Net full adaptation and one LoRA per stitch.

    python benchmarks/bench_training.py --preset mini --steps 8 --out docs/results/bench_training.json

Each method runs in its own fresh process on the same anchors (random weights with the preset's shapes: timing
and memory do not depend on the values) and the same token batches, so peak memory is that method's alone:

- `esta`: one LoRA shared by every stitch + stitch-specific biases (stitched_llama's default).
- `snnet-full`: SN-Net direct adaptation, every anchor and stitching-layer weight trained.
- `lora-per-stitch`: the naive alternative, a separate LoRA adapter for every stitch (peft multi-adapter),
  each trained only on its stitch's steps.

All use AdamW, one stitch per step (round-robin, so every method visits the same stitches). Reported: trainable
parameters, peak resident memory (ru_maxrss on CPU, max_memory_allocated on CUDA) and median time per step
after one warm-up step, with ratios against ESTA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

PRESETS = {
    # (hidden, layers, heads, kv_heads, intermediate) of the small and the large anchor; vocab shared
    "mini": {"vocab": 8192, "small": (256, 8, 4, 2, 768), "large": (512, 12, 8, 4, 1536)},
    "smollm": {"vocab": 49152, "small": (576, 30, 9, 3, 1536), "large": (960, 32, 15, 5, 2560)},
}
METHODS = ("esta", "snnet-full", "lora-per-stitch")


def build_palette(preset: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from stitched_llama import StitchedLlamaForCausalLM

    spec = PRESETS[preset]
    anchors = []
    for i, (hidden, layers, heads, kv, inter) in enumerate((spec["small"], spec["large"])):
        torch.manual_seed(seed + i)
        config = LlamaConfig(
            vocab_size=spec["vocab"],
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=inter,
            tie_word_embeddings=True,
        )
        anchors.append(LlamaForCausalLM(config))
    calibration = torch.randint(spec["vocab"], (16, 128), generator=torch.Generator().manual_seed(seed))
    return StitchedLlamaForCausalLM.from_anchors(*anchors, calibration=calibration)


def run_method(method: str, preset: str, steps: int, batch: int, seq: int, device: str) -> dict:
    from peft import LoraConfig, get_peft_model

    from stitched_llama.esta import EstaConfig, prepare_esta

    palette = build_palette(preset).to(device)
    k = palette.num_stitches
    if method == "lora-per-stitch":
        palette.requires_grad_(False)
        pattern = r"(small|large)\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)|stitch_layers\.[0-9_]+"
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=pattern, task_type="CAUSAL_LM")
        model = get_peft_model(palette, lora, adapter_name="s0")
        for s in range(1, k):
            model.add_adapter(f"s{s}", lora)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)  # every adapter trainable; each step only touches its own
    else:
        model = prepare_esta(palette, EstaConfig(method=method))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = palette.config.vocab_size
    batches = torch.randint(vocab, (steps + 1, batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        stitch = step % k
        if method == "lora-per-stitch":
            model.set_adapter(f"s{stitch}")
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)  # set_adapter freezes the inactive adapters; keep them listed
        start = time.perf_counter()
        loss = model(input_ids=batches[step], labels=batches[step], stitch=stitch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    total = sum(p.numel() for p in palette.parameters())
    return {
        "method": method,
        "stitches": k,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "peak_memory_mb": peak_mb,
        "seconds_per_step": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:  # one method, in this fresh process
        result = run_method(args._child, args.preset, args.steps, args.batch, args.seq, args.device)
        print("RESULT " + json.dumps(result))
        return

    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--_child", method, "--preset", args.preset, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
    base = next(r for r in results if r["method"] == "esta")
    print(f"preset={args.preset} batch={args.batch} seq={args.seq} steps={args.steps} device={args.device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} machine={platform.processor() or platform.machine()}")  # fmt: skip
    print(
        "| method | trainable params | % of palette | peak memory (MB) | s/step | params vs ESTA | memory vs ESTA | time vs ESTA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f}% | {r['peak_memory_mb']:.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['trainable_params'] / base['trainable_params']:.2f}x | "
            f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x | {r['seconds_per_step'] / base['seconds_per_step']:.2f}x |"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        settings = {
            "preset": args.preset,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "device": args.device,
        }
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

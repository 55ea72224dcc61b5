"""Speed overhead of the palette, measured side by side with the plain anchors in one run.

    python benchmarks/bench_overhead.py --preset tiny                     # smoke run, under a minute
    python benchmarks/bench_overhead.py --preset smollm --out overhead.json   # real shapes, ~40 min on 1 core
    python benchmarks/bench_overhead.py --preset smollm-depth                 # Python overhead at real depth

Two questions, each answered with interleaved runs (every repeat runs each case of one comparison once, in
a random order followed by its reverse, after warm-up) and medians over the repeats:

1. Does an anchor stitch cost what the plain anchor costs? Forward time (batch sizes `--batch-sizes`,
   `--seq-len` tokens) and greedy `generate()` time (`--new-tokens` new tokens, `min_new_tokens` =
   `max_new_tokens` so both produce the same length) of stitch 0 (small anchor) and stitch -1 (large anchor)
   against the very same anchor modules called as a plain `LlamaForCausalLM`. Target: <= 1.03x.
2. Does a hybrid stitch cost what its FLOPs say? A line time = a + b * FLOPs/token is fitted through the two
   anchor stitches' median forward times; each hybrid's median forward time is divided by the line's value
   at its FLOPs. Target: within 10%.

The anchors have random weights (timing does not depend on weight values) with the shapes of the preset:
`smollm` is SmolLM2-135M / SmolLM2-360M in float32, `tiny` is small enough for a quick smoke run, and
`smollm-depth` has SmolLM2's depths (30 / 32 layers, 33 stitches) at tiny widths, so the fixed Python cost
per call is measured without seconds of matmuls around it. The stitching layers are fitted on random tokens
(no calibration text is needed to time them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from stitched_llama import StitchedLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stitch_tables import SMOLLM2_135M, SMOLLM2_360M  # noqa: E402  (the published shapes, kept in one place)

TINY_SMALL = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TINY_LARGE = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        small=TINY_SMALL,
        large=TINY_LARGE,
        batch_sizes=[1, 4],
        seq_len=128,
        prompt_len=16,
        new_tokens=32,
        repeats=30,
        warmup=3,
        hybrid_stride=1,
    ),
    # SmolLM2's depths (30 / 32 layers, 33 stitches) at tiny widths: the palette's fixed Python cost per call,
    # which seconds-long CPU forwards of the real shapes hide, shows up here at full size.
    "smollm-depth": dict(
        small=dict(TINY_SMALL, num_hidden_layers=30),
        large=dict(TINY_LARGE, num_hidden_layers=32),
        batch_sizes=[1, 4],
        seq_len=128,
        prompt_len=32,
        new_tokens=32,
        repeats=30,
        warmup=3,
        hybrid_stride=3,
    ),
    "smollm": dict(
        small=SMOLLM2_135M,
        large=SMOLLM2_360M,
        batch_sizes=[1, 4],
        seq_len=128,
        prompt_len=32,
        new_tokens=32,
        repeats=20,
        warmup=2,
        hybrid_stride=3,
    ),
}


def build(small_kwargs: dict, large_kwargs: dict, seed: int = 0) -> StitchedLlamaForCausalLM:
    """Random-weight anchors in float32 (sdpa attention, as transformers picks on CPU) and their palette."""
    anchors = []
    for offset, kwargs in enumerate((small_kwargs, large_kwargs)):
        torch.manual_seed(seed + offset)
        config = LlamaConfig(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "sdpa"
        anchors.append(LlamaForCausalLM(config).to(torch.float32).eval())
    # The palette adopts these very modules, so plain and stitched runs read the same weights in memory.
    return StitchedLlamaForCausalLM.from_anchors(*anchors).eval()


CLOCKS = ("wall", "cpu")


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    """Wall-clock and process CPU seconds of one call. With one intra-op thread, CPU time counts only this
    process's own work, so it stays put when other jobs on a shared machine take the cores for a while."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


Times = dict[object, dict[str, list[float]]]  # case -> clock -> seconds per repeat


def interleaved(cases: dict[object, Callable[[], object]], repeats: int, warmup: int, seed: int = 0) -> Times:
    """Seconds per call of each case. Every repeat runs all cases once: even repeats in a random order, odd
    repeats in the reverse of the order before, so every case sits on average mid-sequence and changes of the
    machine's load hit all cases alike."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    rng = random.Random(seed)
    times: Times = {name: {clock: [] for clock in CLOCKS} for name in names}
    order = names
    for r in range(repeats):
        order = rng.sample(names, len(names)) if r % 2 == 0 else order[::-1]
        for name in order:
            for clock, seconds in _timed(cases[name]).items():
                times[name][clock].append(seconds)
    return times


def compare(times: Times, plain: str, stitched: str) -> dict[str, dict[str, float]]:
    """Per clock: median times, the ratio of medians stitched / plain, and the quartiles of the per-repeat
    ratios (the two runs of one repeat are back to back, so a load change mostly hits both)."""
    out = {}
    for clock in CLOCKS:
        p, s = times[plain][clock], times[stitched][clock]
        q1, q2, q3 = statistics.quantiles([b / a for a, b in zip(p, s)], n=4, method="inclusive")
        out[clock] = {
            "plain_s": statistics.median(p),
            "stitched_s": statistics.median(s),
            "ratio": statistics.median(s) / statistics.median(p),
            "paired_ratio_median": q2,
            "paired_ratio_q1": q1,
            "paired_ratio_q3": q3,
        }
    return out


def bench_anchors(palette: StitchedLlamaForCausalLM, settings: dict) -> list[dict]:
    """Plain anchor vs its anchor stitch: forward at each batch size, then greedy generation."""
    vocab = palette.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    anchors = {"small": (palette.small, 0), "large": (palette.large, palette.num_stitches - 1)}
    rows = []
    for batch in settings["batch_sizes"]:
        input_ids = torch.randint(vocab, (batch, settings["seq_len"]), generator=generator)
        for name, (anchor, k) in anchors.items():
            # Same outputs first: a timing of two different computations would mean nothing.
            torch.testing.assert_close(palette(input_ids, stitch=k).logits, anchor(input_ids).logits)
            cases = {
                "plain": lambda a=anchor, x=input_ids: a(x),
                "stitched": lambda k=k, x=input_ids: palette(x, stitch=k),
            }
            times = interleaved(cases, settings["repeats"], settings["warmup"])
            rows.append({"what": "forward", "anchor": name, "stitch": k, "batch": batch, **compare(times, *cases)})
            rows[-1]["loadavg_1min_after"] = os.getloadavg()[0]  # other jobs on the machine, for the record
            _progress(rows[-1])

    prompt = torch.randint(vocab, (1, settings["prompt_len"]), generator=generator)
    new = settings["new_tokens"]
    gen_kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    for name, (anchor, k) in anchors.items():
        plain_out = anchor.generate(prompt, **gen_kwargs)
        stitched_out = palette.generate(prompt, stitch=k, **gen_kwargs)
        if not torch.equal(plain_out, stitched_out) or plain_out.shape[1] != prompt.shape[1] + new:
            raise AssertionError(f"{name} anchor: palette generation differs from the plain anchor's")
        cases = {
            "plain": lambda a=anchor: a.generate(prompt, **gen_kwargs),
            "stitched": lambda k=k: palette.generate(prompt, stitch=k, **gen_kwargs),
        }
        times = interleaved(cases, settings["repeats"], settings["warmup"])
        rows.append({"what": "generate", "anchor": name, "stitch": k, "batch": 1, **compare(times, *cases)})
        rows[-1]["loadavg_1min_after"] = os.getloadavg()[0]
        _progress(rows[-1])
    return rows


def bench_hybrids(palette: StitchedLlamaForCausalLM, settings: dict) -> dict:
    """Forward time of the anchor stitches and every `hybrid_stride`-th hybrid, against a FLOPs-linear model."""
    last = palette.num_stitches - 1
    hybrids = list(range(1, last))[:: settings["hybrid_stride"]]
    stitches = [0, *hybrids, last]
    batch = settings["batch_sizes"][0]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(palette.config.vocab_size, (batch, settings["seq_len"]), generator=generator)
    cases = {k: (lambda k=k: palette(input_ids, stitch=k)) for k in stitches}
    times = interleaved(cases, settings["repeats"], settings["warmup"])
    flops = {k: palette.config.stitch_cost(k).flops_per_token for k in stitches}
    result: dict = {
        "batch": batch,
        "seq_len": settings["seq_len"],
        "stitches": stitches,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    for clock in CLOCKS:
        medians = {k: statistics.median(times[k][clock]) for k in stitches}
        # The line through the two anchors: b is seconds per FLOP/token, a the FLOP-independent rest.
        b = (medians[last] - medians[0]) / (flops[last] - flops[0])
        a = medians[0] - b * flops[0]
        rows = []
        for k in stitches:
            n, j = palette.config.stitches[k]
            rows.append(
                {
                    "stitch": k,
                    "n": n,
                    "j": j,
                    "layers": palette.config.num_layers(k),
                    "gflops_per_token": flops[k] / 1e9,
                    "measured_s": medians[k],
                    "predicted_s": a + b * flops[k],
                    "measured_over_predicted": medians[k] / (a + b * flops[k]),
                }
            )
        result[clock] = {"intercept_s": a, "s_per_gflop": b * 1e9, "rows": rows}
    return result


def _progress(row: dict) -> None:
    w, c = row["wall"], row["cpu"]
    print(
        f"  {row['what']:8s} {row['anchor']:5s} batch {row['batch']}: plain {w['plain_s'] * 1e3:.1f} ms, "
        f"stitched {w['stitched_s'] * 1e3:.1f} ms, ratio wall {w['ratio']:.3f} cpu {c['ratio']:.3f}",
        file=sys.stderr,
        flush=True,
    )


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(result: dict) -> str:
    """Tables of the run; targets are judged on the clock named by `result["clock"]`."""
    clock = result["clock"]
    lines = []
    if result["anchors"]:
        lines += [
            f"Anchor stitch vs plain anchor (times: median {clock} time; ratio = palette / plain):",
            "",
            "| measurement | anchor (stitch) | batch | plain | palette | ratio, CPU | ratio, wall "
            "| per-repeat ratio, CPU: median [q1, q3] | target <= 1.03 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in result["anchors"]:
        m, c, w = r[clock], r["cpu"], r["wall"]
        lines.append(
            f"| {r['what']} | {r['anchor']} ({r['stitch']}) | {r['batch']} | {m['plain_s'] * 1e3:.1f} ms | "
            f"{m['stitched_s'] * 1e3:.1f} ms | {c['ratio']:.3f} | {w['ratio']:.3f} | "
            f"{c['paired_ratio_median']:.3f} [{c['paired_ratio_q1']:.3f}, {c['paired_ratio_q3']:.3f}] | "
            f"{_verdict(m['ratio'] <= 1.03)} |"
        )
    h = result["hybrids"]
    if h is None:
        return "\n".join(lines)
    fit = h[clock]
    last = h["stitches"][-1]
    lines += [
        "",
        f"Hybrid forward time vs FLOPs (batch {h['batch']}, {h['seq_len']} tokens, median {clock} time; line "
        f"through the two anchors: {fit['intercept_s'] * 1e3:.1f} ms + {fit['s_per_gflop'] * 1e3:.1f} ms per "
        "GFLOP/token):",
        "",
        "| stitch | (n, j) | layers | GFLOPs/token | measured | predicted | measured / predicted, CPU "
        "| measured / predicted, wall | target within 10% |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r, rc, rw in zip(fit["rows"], h["cpu"]["rows"], h["wall"]["rows"]):
        dev = r["measured_over_predicted"]
        ok = "(fit point)" if r["stitch"] in (0, last) else _verdict(abs(dev - 1) <= 0.10)
        lines.append(
            f"| {r['stitch']} | ({r['n']}, {r['j']}) | {r['layers']} | {r['gflops_per_token']:.3f} | "
            f"{r['measured_s'] * 1e3:.1f} ms | {r['predicted_s'] * 1e3:.1f} ms | "
            f"{rc['measured_over_predicted']:.3f} | {rw['measured_over_predicted']:.3f} | {ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="anchor shapes and default settings")
    parser.add_argument("--repeats", type=int, help="timed runs per case (median taken); default from the preset")
    parser.add_argument("--warmup", type=int, help="untimed runs per case before timing; default from the preset")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="forward batch sizes; default from the preset")
    parser.add_argument("--seq-len", type=int, help="forward sequence length; default from the preset")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per generate() call")
    parser.add_argument("--hybrid-stride", type=int, help="time every k-th hybrid stitch (1 = all)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads; 1 keeps CPU time a clean measure of the work"
    )
    parser.add_argument(
        "--clock", choices=CLOCKS, default="cpu", help="which clock the targets are judged on (both are recorded)"
    )
    parser.add_argument("--skip-anchors", action="store_true", help="only the hybrid-vs-FLOPs part")
    parser.add_argument("--skip-hybrids", action="store_true", help="only the plain-vs-palette part")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    args = parser.parse_args()

    settings = dict(PRESETS[args.preset])
    for key in ("repeats", "warmup", "batch_sizes", "seq_len", "new_tokens", "hybrid_stride"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["repeats"] < 2:
        parser.error(f"--repeats {settings['repeats']} is too few: pass at least 2 (quartiles need two runs).")
    torch.set_num_threads(args.threads)
    # Random-token calibration is intended here: silence its warning and the fit's progress bar.
    logging.get_logger("stitched_llama").setLevel(logging.ERROR)
    logging.disable_progress_bar()

    load_before = os.getloadavg()
    started = time.time()
    with torch.inference_mode():
        palette = build(settings["small"], settings["large"])
        print(f"Built the {args.preset} palette ({palette.num_stitches} stitches).", file=sys.stderr, flush=True)
        anchors = [] if args.skip_anchors else bench_anchors(palette, settings)
        hybrids = None if args.skip_hybrids else bench_hybrids(palette, settings)
    result = {
        "preset": args.preset,
        "clock": args.clock,
        "settings": {k: v for k, v in settings.items() if k not in ("small", "large")},
        "small_config": settings["small"],
        "large_config": settings["large"],
        "dtype": "float32",
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "anchors": anchors,
        "hybrids": hybrids,
    }
    print(f"Preset {args.preset}, {result['machine']['cpu']}, torch {torch.__version__}, {args.threads} threads.")
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

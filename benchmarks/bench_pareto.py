"""Measured Pareto fronts of a real palette: Qwen2.5-Coder 0.5B (small) and 1.5B (large), before and after tuning.

    # reduced setting: CPU, fp32, anchors + 5 hybrids, 40 steps per method (see SETTINGS["reduced"])
    nice -n 10 python benchmarks/bench_pareto.py --setting reduced --out docs/results
    # full setting: GPU, bf16 autocast, every stitch of the default palette, 1000 steps per method
    python benchmarks/bench_pareto.py --setting full --device cuda --out docs/results

Anchors, WordNet instructions and held-out text come from `benchmarks/prepare_anchors.py` and
`benchmarks/prepare_data.py` (cache dir: `--cache-dir`, `$STITCHED_LLAMA_CACHE` or `~/.cache/stitched_llama`).

Phases, each run in its own subprocess (so its memory peak is its own) and skipped when its JSON exists
(`--force` reruns):

- `init`: `StitchedLlamaForCausalLM.from_anchors` with least-squares init on python_docs_calib; per-stitch
  perplexity on python_docs_heldout; WordNet test loss / perplexity and greedy-generation token F1 of the untuned
  palette; chat transcripts before tuning.
- `esta-importance`, `esta-uniform`, `snnet-full`: the same palette (stitching layers reloaded, not refitted),
  trained for the same number of steps on the same WordNet train examples in the same order, then evaluated like
  `init`. Records trainable parameters, peak memory and time per step.
- `report`: `pareto_<setting>.json`, `pareto_<setting>.png`, `pareto.md` and `transcripts.md` under `--out`.

SN-Net direct adaptation (`snnet-full`) trains every weight of both anchors (2.1B parameters). AdamW in fp32 needs
16 bytes per parameter (weights, gradients, two moments), about 34 GB: more than a 24 GB CPU machine has. The
reduced setting therefore runs it with `--snnet-optimizer adafactor-fused` (default there): Adafactor
(factored second moments, no first moment, update clipping 1.0) applied to each parameter as soon as its gradient
is complete during backward, then the gradient is freed, so no full set of gradients or moments ever exists. This
is SN-Net's trainable set and sampling with a memory-light optimizer, not SN-Net's AdamW; the report says so and
also gives AdamW's analytic memory. The full setting uses AdamW.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import torch

try:  # run as a script (benchmarks/ is on sys.path) ...
    from _paths import QWEN_LARGE_DIR, QWEN_SMALL_DIR, TEXT_DIR, WORDNET_DIR, resolve_cache_dir
except ImportError:  # ... or as ``python -m benchmarks.bench_pareto`` from the repo root
    from benchmarks._paths import QWEN_LARGE_DIR, QWEN_SMALL_DIR, TEXT_DIR, WORDNET_DIR, resolve_cache_dir

METHODS = {  # phase -> (StitchTrainingArguments.method, sampling)
    "esta-importance": ("esta", "importance"),
    "esta-uniform": ("esta", "uniform"),
    "snnet-full": ("snnet-full", "uniform"),
}
PHASES = ("init", *METHODS, "diag-pos0", "diag-sink", "report")
DEFAULT_PHASES = ("init", *METHODS, "report")  # diag-pos0 and diag-sink are optional diagnostics
TRANSCRIPT_PROMPTS = (
    'Define the word "harbor".',
    None,  # the first WordNet test prompt, filled in at run time
    "Write a Python function that checks whether a string is a palindrome.",
)


@dataclasses.dataclass
class Setting:
    device: str
    amp_bf16: bool  # bf16 autocast for training and evaluation (weights stay fp32)
    num_hybrids: int | None  # hybrids spread over the cost range; None = every stitch of the default palette
    calib_tokens: int
    calib_len: int
    heldout_seqs: int
    heldout_len: int
    heldout_texts: tuple[str, ...]
    heldout_after_training: bool
    train_max_length: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr_lora: float
    lr_full: float
    lora_r: int
    eval_examples: int
    eval_batch_size: int
    gen_examples: int
    max_new_tokens: int
    transcript_new_tokens: int
    snnet_optimizer: str  # "adamw" or "adafactor-fused"
    map_first_token: bool = True  # from_anchors' first-token mapping (off: the plain least-squares stitch)
    seed: int = 0


SETTINGS = {
    "reduced": Setting(
        device="cpu",
        amp_bf16=False,
        num_hybrids=5,
        calib_tokens=8192,
        calib_len=256,
        heldout_seqs=8,
        heldout_len=256,
        heldout_texts=("python_docs",),
        heldout_after_training=False,
        train_max_length=64,
        batch_size=2,
        steps=40,
        warmup_steps=4,
        lr_lora=5e-4,
        lr_full=2e-5,
        lora_r=8,
        eval_examples=24,
        eval_batch_size=8,
        gen_examples=8,
        max_new_tokens=24,
        transcript_new_tokens=40,
        snnet_optimizer="adafactor-fused",
    ),
    # A few minutes' check that every code path runs (not a measurement).
    "smoke": Setting(
        device="cpu",
        amp_bf16=False,
        num_hybrids=2,
        calib_tokens=1024,
        calib_len=256,
        heldout_seqs=2,
        heldout_len=32,
        heldout_texts=("python_docs",),
        heldout_after_training=False,
        train_max_length=64,
        batch_size=1,
        steps=3,
        warmup_steps=1,
        lr_lora=5e-4,
        lr_full=2e-5,
        lora_r=8,
        eval_examples=2,
        eval_batch_size=2,
        gen_examples=2,
        max_new_tokens=4,
        transcript_new_tokens=4,
        snnet_optimizer="adafactor-fused",
    ),
    "full": Setting(
        device="cuda",
        amp_bf16=True,
        num_hybrids=None,
        calib_tokens=8192,
        calib_len=512,
        heldout_seqs=64,
        heldout_len=512,
        heldout_texts=("python_docs", "shakespeare"),
        heldout_after_training=True,
        train_max_length=128,
        batch_size=16,
        steps=1000,
        warmup_steps=50,
        lr_lora=2e-4,
        lr_full=1e-5,
        lora_r=8,
        eval_examples=512,
        eval_batch_size=32,
        gen_examples=128,
        max_new_tokens=48,
        transcript_new_tokens=96,
        snnet_optimizer="adamw",
    ),
}


def log(msg: str) -> None:
    print(f"[bench_pareto {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Machine, memory and timing
# ----------------------------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import peft
    import psutil
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    return info


class PeakMemory:
    """Peak memory inside a `with` block: RSS sampled by a thread on CPU, `max_memory_allocated` on CUDA."""

    def __init__(self, device: str, interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.peak_rss = 0
        self.start_rss = 0
        self.peak_cuda = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self.device == "cuda":
            self.peak_cuda = torch.cuda.max_memory_allocated()

    def as_dict(self) -> dict:
        return {
            "rss_before_gib": self.start_rss / 2**30,
            "peak_rss_gib": self.peak_rss / 2**30,
            "peak_cuda_allocated_gib": None if self.peak_cuda is None else self.peak_cuda / 2**30,
        }


def process_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def text_chunks(path: Path, tokenizer: Any, num: int, length: int) -> torch.LongTensor:
    """`num` non-overlapping windows of `length` tokens, spread evenly over the whole file."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < num * length:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than {num} x {length}: lower the setting.")
    stride = len(ids) // num
    return torch.tensor([ids[i * stride : i * stride + length] for i in range(num)], dtype=torch.long)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wordnet_subset(cache: Path, split: str, count: int, seed: int) -> list[dict]:
    records = read_jsonl(cache / WORDNET_DIR / f"{split}.jsonl")
    random.Random(seed).shuffle(records)
    return records[:count]


def tokenized_examples(records: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Records tokenized with response-only labels; records longer than `max_length` are skipped, not cut."""
    from stitched_llama.data import tokenize_example

    out = []
    for r in records:
        example = tokenize_example(r, tokenizer)
        if len(example["input_ids"]) <= max_length:
            out.append(example)
    return out


def _norm_words(text: str) -> list[str]:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return [w for w in text.split() if w not in {"a", "an", "the"}]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 (lower case, punctuation and articles removed)."""
    pred, ref = _norm_words(prediction), _norm_words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# Palette building and evaluation
# ----------------------------------------------------------------------------------------------------------------


def parse_stitches(spec: str | None) -> list[tuple[int, int]] | None:
    """`"n:j,n:j"` -> hybrid pairs; None or "auto" -> chosen by the setting; "all" -> the default palette."""
    if spec is None or spec == "auto":
        return None
    if spec == "all":
        return []
    pairs = []
    for item in spec.split(","):
        n, j = item.strip().split(":")
        pairs.append((int(n), int(j)))
    return pairs


def choose_stitches(small_cfg: Any, large_cfg: Any, num_hybrids: int | None) -> list[tuple[int, int]]:
    """Both anchors plus `num_hybrids` hybrids of the default palette at evenly spaced FLOPs (mid-quantiles)."""
    from stitched_llama import StitchedLlamaConfig

    config = StitchedLlamaConfig(small_config=small_cfg, large_config=large_cfg)
    stitches = [tuple(s) for s in config.stitches]
    if num_hybrids is None:
        return stitches
    hybrids = list(range(1, len(stitches) - 1))
    flops = {k: config.stitch_cost(k).flops_per_token for k in hybrids}
    lo, hi = min(flops.values()), max(flops.values())
    chosen: list[int] = []
    for i in range(num_hybrids):
        target = lo + (i + 0.5) / num_hybrids * (hi - lo)
        k = min((k for k in hybrids if k not in chosen), key=lambda k: abs(flops[k] - target))
        chosen.append(k)
    return [stitches[0], *(stitches[k] for k in sorted(chosen)), stitches[-1]]


def load_anchor(path: Path, setting: Setting) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if setting.device != "cpu":
        kwargs["device_map"] = setting.device
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def reload_palette(paths: dict, init: dict, work: Path, setting: Setting) -> Any:
    """The LS-initialised palette of the `init` phase, rebuilt from the anchors and its saved stitching layers
    (and first-token states)."""
    from safetensors.torch import load_file

    from stitched_llama import StitchedLlamaConfig, StitchedLlamaForCausalLM

    small, large = load_anchor(paths["small"], setting), load_anchor(paths["large"], setting)
    attn = {small.config._attn_implementation, large.config._attn_implementation}
    config = StitchedLlamaConfig(
        small_config=small.config,
        large_config=large.config,
        stitches=[list(s) for s in init["stitches"]],
        map_first_token=init.get("map_first_token", False),
        attn_implementation=attn.pop() if len(attn) == 1 else None,
    )
    palette = StitchedLlamaForCausalLM(config, small=small, large=large)
    reference = large.get_input_embeddings().weight
    state = load_file(work / "stitching.safetensors")
    missing, unexpected = palette.load_state_dict(state, strict=False)
    if unexpected or any(m.startswith(("stitch_layers.", "first_token_states.")) for m in missing):
        raise RuntimeError(f"{work / 'stitching.safetensors'} does not fit this palette: rerun the init phase.")
    palette.stitch_layers.to(device=reference.device, dtype=reference.dtype)
    palette.first_token_states.to(device=reference.device, dtype=reference.dtype)
    return palette.eval()


def autocast(setting: Setting):
    if setting.amp_bf16:
        return torch.autocast(device_type=setting.device, dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@torch.no_grad()
def fingerprint(palette: Any, setting: Setting) -> list[float]:
    """Logit sums of every stitch on a fixed input: the reloaded palette must match the fitted one."""
    ids = torch.arange(1000, 1016, device=palette.device).unsqueeze(0)
    out = []
    for k in range(palette.num_stitches):
        with autocast(setting):
            out.append(float(palette(input_ids=ids, stitch=k, use_cache=False).logits.float().sum()))
    return out


@torch.no_grad()
def text_perplexity(
    palette: Any, chunks: torch.LongTensor, setting: Setting, batch_size: int = 4, stitches: list[int] | None = None
) -> list[dict]:
    """Per-stitch next-token perplexity on fixed windows (every position but the first is predicted)."""
    rows = []
    for k in range(palette.num_stitches) if stitches is None else stitches:
        total, count, start = 0.0, 0, time.perf_counter()
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i : i + batch_size].to(palette.device)
            with autocast(setting):
                logits = palette(input_ids=ids, stitch=k, use_cache=False).logits.float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += ids[:, 1:].numel()
        rows.append({"stitch": k, "loss": total / count, "perplexity": math.exp(total / count), "tokens": count})
        log(f"  stitch {k}: perplexity {rows[-1]['perplexity']:.2f} ({time.perf_counter() - start:.0f}s)")
    return rows


@torch.no_grad()
def instruction_loss(palette: Any, examples: list[dict], tokenizer: Any, setting: Setting) -> list[dict]:
    """Per-stitch mean loss over response tokens (token-weighted) of tokenized WordNet examples."""
    from stitched_llama.data import collate_fn

    collator = collate_fn(tokenizer)
    batches = [
        collator(examples[i : i + setting.eval_batch_size]) for i in range(0, len(examples), setting.eval_batch_size)
    ]
    rows = []
    for k in range(palette.num_stitches):
        total, count = 0.0, 0
        for batch in batches:
            ids = batch["input_ids"].to(palette.device)
            mask = batch["attention_mask"].to(palette.device)
            labels = batch["labels"].to(palette.device)
            with autocast(setting):
                logits = palette(input_ids=ids, attention_mask=mask, stitch=k, use_cache=False).logits.float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    labels[:, 1:].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((labels[:, 1:] != -100).sum())
        rows.append({"stitch": k, "loss": total / count, "perplexity": math.exp(total / count), "tokens": count})
        log(f"  stitch {k}: WordNet test perplexity {rows[-1]['perplexity']:.2f}")
    return rows


@torch.no_grad()
def generate(palette: Any, tokenizer: Any, prompts: list[str], stitch: int, max_new_tokens: int, setting: Setting):
    """Greedy answers of one stitch to chat prompts, batched with left padding."""
    import copy

    from stitched_llama.data import format_prompt

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    texts = [format_prompt({"instruction": p, "input": "", "output": ""}, tok) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=tok.chat_template is None)
    enc = {k: v.to(palette.device) for k, v in enc.items()}
    eos = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id} if t is not None]
    with autocast(setting):
        out = palette.generate(
            **enc,
            stitch=stitch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
    return [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


def generation_f1(palette: Any, tokenizer: Any, records: list[dict], setting: Setting) -> list[dict]:
    prompts = [r["instruction"] for r in records]
    rows = []
    for k in range(palette.num_stitches):
        start = time.perf_counter()
        answers = generate(palette, tokenizer, prompts, k, setting.max_new_tokens, setting)
        scores = [token_f1(a, r["output"]) for a, r in zip(answers, records)]
        rows.append(
            {
                "stitch": k,
                "token_f1": sum(scores) / len(scores),
                "examples": [{"prompt": p, "answer": a, "f1": s} for p, a, s in zip(prompts, answers, scores)],
            }
        )
        log(f"  stitch {k}: token F1 {rows[-1]['token_f1']:.3f} ({time.perf_counter() - start:.0f}s)")
    return rows


def transcript_stitches(palette: Any) -> list[int]:
    """Small anchor, the hybrids nearest 1/3 and 2/3 of the cost range, large anchor."""
    flops = [c["flops_per_token"] for c in palette.stitch_table()]
    lo, hi = flops[0], flops[-1]
    hybrids = list(range(1, palette.num_stitches - 1))
    picks = []
    for frac in (1 / 3, 2 / 3):
        k = min((k for k in hybrids if k not in picks), key=lambda k: abs(flops[k] - (lo + frac * (hi - lo))))
        picks.append(k)
    return [0, *sorted(picks), palette.num_stitches - 1]


def transcripts(palette: Any, tokenizer: Any, prompts: list[str], setting: Setting) -> list[dict]:
    rows = []
    for k in transcript_stitches(palette):
        answers = generate(palette, tokenizer, prompts, k, setting.transcript_new_tokens, setting)
        rows.append({"stitch": k, "answers": answers})
    return rows


def evaluate_palette(palette: Any, tokenizer: Any, data: dict, setting: Setting, heldout: bool) -> dict:
    result: dict[str, Any] = {}
    if heldout:
        for name, chunks in data["heldout"].items():
            log(f"held-out perplexity on {name}")
            start = time.perf_counter()
            result[f"heldout_{name}"] = text_perplexity(palette, chunks, setting)
            result[f"heldout_{name}_seconds"] = time.perf_counter() - start
    log("WordNet test loss")
    result["wordnet_test"] = instruction_loss(palette, data["eval_examples"], tokenizer, setting)
    log("WordNet greedy generation")
    result["wordnet_generation"] = generation_f1(palette, tokenizer, data["gen_records"], setting)
    return result


def load_data(cache: Path, tokenizer: Any, setting: Setting) -> dict:
    heldout = {
        name: text_chunks(
            cache / TEXT_DIR / f"{name}_heldout.txt", tokenizer, setting.heldout_seqs, setting.heldout_len
        )
        for name in setting.heldout_texts
    }
    from stitched_llama.data import tokenize_example

    test = wordnet_subset(cache, "test", 4 * setting.eval_examples, setting.seed)
    pairs = [(r, tokenize_example(r, tokenizer)) for r in test]
    pairs = [(r, e) for r, e in pairs if len(e["input_ids"]) <= setting.train_max_length][: setting.eval_examples]
    eval_examples = [e for _, e in pairs]
    kept = [r for r, _ in pairs]
    first_test = read_jsonl(cache / WORDNET_DIR / "test.jsonl")[0]
    prompts = [p if p is not None else first_test["instruction"] for p in TRANSCRIPT_PROMPTS]
    return {
        "heldout": heldout,
        "eval_examples": eval_examples,
        "gen_records": kept[: setting.gen_examples],
        "transcript_prompts": prompts,
        "transcript_references": {first_test["instruction"]: first_test["output"]},
    }


# ----------------------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------------------


def run_init(ctx: dict) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from stitched_llama import StitchedLlamaForCausalLM

    setting, paths, work = ctx["setting"], ctx["paths"], ctx["work"]
    tokenizer = AutoTokenizer.from_pretrained(paths["small"])
    stitches = ctx["stitches"]
    if stitches is None:
        stitches = choose_stitches(
            AutoConfig.from_pretrained(paths["small"]), AutoConfig.from_pretrained(paths["large"]), setting.num_hybrids
        )
    num = setting.calib_tokens // setting.calib_len
    calibration = text_chunks(paths["calib"], tokenizer, num, setting.calib_len)
    log(f"building the palette: {len(stitches)} stitches, {calibration.numel()} calibration tokens")
    kwargs = {"dtype": torch.float32}
    if setting.device != "cpu":
        kwargs["device_map"] = setting.device
    start = time.perf_counter()
    palette = StitchedLlamaForCausalLM.from_anchors(
        paths["small"],
        paths["large"],
        stitches=stitches,
        calibration=calibration,
        tokenizer=tokenizer,
        max_length=setting.calib_len,
        batch_size=4,
        map_first_token=setting.map_first_token,
        **kwargs,
    ).eval()
    build_seconds = time.perf_counter() - start
    log(f"palette built in {build_seconds:.0f}s; fit errors {palette.stitch_fit_errors}")
    log(palette.format_stitch_table())
    work.mkdir(parents=True, exist_ok=True)
    stitching = {
        f"{prefix}.{k}": v.detach().float().cpu().contiguous()
        for prefix in ("stitch_layers", "first_token_states")
        for k, v in getattr(palette, prefix).state_dict().items()
    }
    save_file(stitching, work / "stitching.safetensors")
    data = load_data(ctx["cache"], tokenizer, setting)
    result = {
        "stitches": [list(s) for s in palette.config.stitches],
        "stitch_table": palette.stitch_table(),
        "fit_errors": palette.stitch_fit_errors,
        "map_first_token": palette.config.map_first_token,
        "calibration_tokens": int(calibration.numel()),
        "build_seconds": build_seconds,
        "fingerprint": fingerprint(palette, setting),
        "transcript_prompts": data["transcript_prompts"],
        "transcript_references": data["transcript_references"],
        "eval_examples": len(data["eval_examples"]),
        "gen_examples": len(data["gen_records"]),
    }
    start = time.perf_counter()
    result["eval"] = evaluate_palette(palette, tokenizer, data, setting, heldout=True)
    result["eval_seconds"] = time.perf_counter() - start
    log("transcripts before tuning")
    result["transcripts"] = transcripts(palette, tokenizer, data["transcript_prompts"], setting)
    return result


def run_diag_pos0(ctx: dict) -> dict:
    """Diagnostic: held-out perplexity of the LS-init hybrids when position 0 after the stitching layer is replaced
    by the large anchor's mean position-0 state entering layer `j` (docs/concepts.md).

    Position 0 sees only its own token, so the large anchor's state there comes from a 1-token forward pass.
    """
    from transformers import AutoTokenizer

    setting, paths, work = ctx["setting"], ctx["paths"], ctx["work"]
    init = json.loads((ctx["raw"] / "init.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(paths["small"])
    palette = reload_palette(paths, init, work, setting)
    calibration = text_chunks(paths["calib"], tokenizer, setting.calib_tokens // setting.calib_len, setting.calib_len)
    stitches = [tuple(s) for s in palette.config.stitches]
    entries = sorted({j for k, (n, j) in enumerate(stitches) if palette.config.stitch_layer_key(k) is not None})
    captured: dict[int, torch.Tensor] = {}

    def keep(j: int):
        def hook(module, args, kwargs):
            captured[j] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [palette.large.model.layers[j].register_forward_pre_hook(keep(j), with_kwargs=True) for j in entries]
    with torch.no_grad():
        palette.large.model(input_ids=calibration[:, :1].to(palette.device))
    for h in handles:
        h.remove()
    constant = {j: captured[j][:, 0].mean(0) for j in entries}
    spread = {
        j: float((captured[j][:, 0] - constant[j]).norm(dim=-1).mean() / constant[j].norm().clamp_min(1e-12))
        for j in entries
    }
    # Same statistic after the stitching layer (what the hybrid feeds the large anchor at position 0).
    ids = calibration[:, :1].to(palette.device)
    stitched_gap = {}
    with torch.no_grad():
        for k, (n, j) in enumerate(stitches):
            key = palette.config.stitch_layer_key(k)
            if key is None:
                continue
            hidden = palette.small.model(input_ids=ids, output_hidden_states=True).hidden_states[n]
            mapped = palette.stitch_layers[key](hidden)[:, 0]
            stitched_gap[k] = float(
                (mapped - captured[j][:, 0]).norm(dim=-1).mean() / captured[j][:, 0].norm(dim=-1).mean()
            )

    current: dict[str, int] = {}

    def remember(module, args, kwargs):  # text_perplexity passes `stitch=k` to every forward
        current["stitch"] = kwargs["stitch"]

    def fix(module, args, output):
        if output.shape[1] > 1:  # a full window starting at position 0 (no cache in this evaluation)
            output = output.clone()
            output[:, 0] = constant[stitches[current["stitch"]][1]].to(output.dtype)
        return output

    fix_handles = [layer.register_forward_hook(fix) for layer in palette.stitch_layers.values()]
    fix_handles.append(palette.register_forward_pre_hook(remember, with_kwargs=True))
    hybrids = [k for k in range(palette.num_stitches) if palette.config.stitch_layer_key(k) is not None]
    data = {
        name: text_chunks(
            ctx["cache"] / TEXT_DIR / f"{name}_heldout.txt", tokenizer, setting.heldout_seqs, setting.heldout_len
        )
        for name in setting.heldout_texts
    }
    result: dict[str, Any] = {
        "stitches": init["stitches"],
        "pos0_relative_spread_large": {str(j): v for j, v in spread.items()},
        "pos0_relative_gap_stitched": {str(k): v for k, v in stitched_gap.items()},
        "eval": {},
    }
    for name, chunks in data.items():
        log(f"held-out perplexity on {name}, position 0 mapped to the large anchor's constant")
        result["eval"][f"heldout_{name}"] = _full_rows(
            text_perplexity(palette, chunks, setting, stitches=hybrids), palette.num_stitches
        )
    for h in fix_handles:
        h.remove()
    try:
        result["outliers"] = outlier_diagnostic(palette, tokenizer, calibration, data["python_docs"], setting)
    except Exception as error:  # a diagnostic must not stop the run
        log(f"outlier diagnostic failed: {error!r}")
        result["outliers"] = {"error": repr(error)}
    return result


def _full_rows(rows: list[dict], num: int) -> list[dict]:
    by_stitch = {r["stitch"]: r for r in rows}
    return [by_stitch.get(k, {"stitch": k, "loss": None, "perplexity": None, "tokens": None}) for k in range(num)]


class _Stop(Exception):
    pass


@torch.no_grad()
def _collect_states(
    palette: Any, ids: torch.LongTensor, pairs: list[tuple[int, int]], batch: int = 4, keep_first: bool = False
):
    """X[n]: small anchor after n layers, Y[j]: large anchor entering layer j; position 0 dropped unless
    `keep_first`; float64, flattened over batch and positions."""
    start = 0 if keep_first else 1
    ns, js = sorted({n for n, _ in pairs}), sorted({j for _, j in pairs})
    cap: dict = {}

    def out_hook(n: int):
        def hook(module, args, output):
            cap[("s", n)] = output[0] if isinstance(output, tuple) else output

        return hook

    def in_hook(j: int):
        def hook(module, args, kwargs):
            cap[("l", j)] = args[0] if args else kwargs["hidden_states"]

        return hook

    def stop(*args):
        raise _Stop

    handles = [palette.small.model.layers[n - 1].register_forward_hook(out_hook(n)) for n in ns]
    handles += [palette.large.model.layers[j].register_forward_pre_hook(in_hook(j), with_kwargs=True) for j in js]
    handles.append(palette.small.model.layers[max(ns) - 1].register_forward_hook(stop))  # runs after out_hook
    handles.append(palette.large.model.layers[max(js)].register_forward_pre_hook(stop))
    xs: dict[int, list] = {n: [] for n in ns}
    ys: dict[int, list] = {j: [] for j in js}
    try:
        for i in range(0, len(ids), batch):
            b = ids[i : i + batch].to(palette.device)
            for model in (palette.small.model, palette.large.model):
                try:
                    model(input_ids=b, use_cache=False)
                except _Stop:
                    pass
            for n in ns:
                xs[n].append(cap[("s", n)][:, start:].reshape(-1, cap[("s", n)].shape[-1]).double().cpu())
            for j in js:
                ys[j].append(cap[("l", j)][:, start:].reshape(-1, cap[("l", j)].shape[-1]).double().cpu())
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}, {j: torch.cat(v) for j, v in ys.items()}


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """The library's fit (stitch_init.ridge_solve) on states held in memory, so the diagnostics can filter them."""
    from stitched_llama.stitch_init import ridge_solve

    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return ridge_solve(x1.T @ x1, x1.T @ y, ridge)


def _rel_err(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(x) == 0:
        return None
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return float((x1 @ w - y).norm() / y.norm())


def outlier_diagnostic(
    palette: Any, tokenizer: Any, calibration: torch.LongTensor, heldout: torch.LongTensor, setting: Setting
) -> dict:
    """Do a few tokens with huge hidden-state norms (massive activations past position 0) dominate the LS fit?

    On half of the calibration windows: token norms of the fit targets, the library's fit (refitted on these windows)
    and a fit that leaves out tokens whose target norm exceeds 5x the median; relative errors on held-out windows,
    split into ordinary and outlier tokens; and held-out perplexity of the hybrids with the outlier-free fit.
    """
    stitches = [tuple(s) for s in palette.config.stitches]
    hybrids = [k for k in range(len(stitches)) if palette.config.stitch_layer_key(k) is not None]
    pairs = [stitches[k] for k in hybrids]
    log("outlier diagnostic: collecting hidden states")
    xc, yc = _collect_states(palette, calibration[::2], pairs)
    xh, yh = _collect_states(palette, heldout, pairs)
    held_tokens = heldout[:, 1:].reshape(-1)
    rows, robust = {}, {}
    for k in hybrids:
        n, j = stitches[k]
        norms_c, norms_h = yc[j].norm(dim=1), yh[j].norm(dim=1)
        threshold = 5 * float(norms_c.median())
        out_c, out_h = norms_c > threshold, norms_h > threshold
        sq = (norms_c**2).sort(descending=True).values
        w_plain = _ridge_fit(xc[n], yc[j])
        w_robust = _ridge_fit(xc[n][~out_c], yc[j][~out_c])
        layer = palette.stitch_layers[palette.config.stitch_layer_key(k)]
        w_lib = torch.cat([layer.weight.detach().T, layer.bias.detach()[None]]).double().cpu()
        rows[str(k)] = {
            "n": n,
            "j": j,
            "target_norm_median": float(norms_c.median()),
            "target_norm_p99": float(norms_c.quantile(0.99)),
            "target_norm_max": float(norms_c.max()),
            "outlier_threshold": threshold,
            "outlier_share_calibration": float(out_c.float().mean()),
            "outlier_share_heldout": float(out_h.float().mean()),
            "sum_sq_share_top1pct": float(sq[: max(1, len(sq) // 100)].sum() / sq.sum()),
            "heldout_err_library_fit": _rel_err(w_lib, xh[n], yh[j]),
            "heldout_err_library_fit_ordinary": _rel_err(w_lib, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_library_fit_outliers": _rel_err(w_lib, xh[n][out_h], yh[j][out_h]),
            "heldout_err_refit_ordinary": _rel_err(w_plain, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_outlier_free_fit_ordinary": _rel_err(w_robust, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_outlier_free_fit_outliers": _rel_err(w_robust, xh[n][out_h], yh[j][out_h]),
            "outlier_tokens_heldout": sorted({tokenizer.decode([int(t)]) for t in held_tokens[out_h]})[:30],
        }
        robust[k] = w_robust
        log(f"  stitch {k} {(n, j)}: {json.dumps(rows[str(k)])}")
    with torch.no_grad():
        for k, w in robust.items():
            layer = palette.stitch_layers[palette.config.stitch_layer_key(k)]
            layer.weight.copy_(w[:-1].T.to(layer.weight.dtype))
            layer.bias.copy_(w[-1].to(layer.bias.dtype))
    log("held-out perplexity with the outlier-free fit")
    ppl = text_perplexity(palette, heldout, setting, stitches=hybrids)
    for r in ppl:
        rows[str(r["stitch"])]["heldout_perplexity_outlier_free_fit"] = r["perplexity"]
    return {"calibration_tokens": len(yc[pairs[0][1]]), "heldout_tokens": len(yh[pairs[0][1]]), "stitches": rows}


def run_diag_sink(ctx: dict) -> dict:
    """Diagnostic: a sink-aware stitch. The small anchor's states with a massive norm (position 0 and the rare
    later attention-sink tokens) are mapped to the large anchor's mean state there; P_n is refitted on the other
    tokens only (same objective and ridge as the library). Held-out perplexity of the hybrids.
    """
    from transformers import AutoTokenizer

    setting, paths, work = ctx["setting"], ctx["paths"], ctx["work"]
    init = json.loads((ctx["raw"] / "init.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(paths["small"])
    palette = reload_palette(paths, init, work, setting)
    calibration = text_chunks(paths["calib"], tokenizer, setting.calib_tokens // setting.calib_len, setting.calib_len)
    heldout = text_chunks(
        ctx["cache"] / TEXT_DIR / "python_docs_heldout.txt", tokenizer, setting.heldout_seqs, setting.heldout_len
    )
    stitches = [tuple(s) for s in palette.config.stitches]
    hybrids = [k for k in range(len(stitches)) if palette.config.stitch_layer_key(k) is not None]
    pairs = [stitches[k] for k in hybrids]
    log("sink diagnostic: collecting hidden states (position 0 kept)")
    xc, yc = _collect_states(palette, calibration, pairs, keep_first=True)
    first = torch.zeros(len(calibration), calibration.shape[1], dtype=torch.bool)
    first[:, 0] = True
    first = first.reshape(-1)
    rows, plans = {}, {}
    for k in hybrids:
        n, j = stitches[k]
        x_norm, y_norm = xc[n].norm(dim=1), yc[j].norm(dim=1)
        x_thr = 5 * float(x_norm[~first].median())
        y_thr = 5 * float(y_norm[~first].median())
        x_sink, y_sink = (x_norm > x_thr) & ~first, (y_norm > y_thr) & ~first
        ordinary = ~first & ~x_sink
        w = _ridge_fit(xc[n][ordinary], yc[j][ordinary])
        c_first = yc[j][first].mean(0)
        c_sink = yc[j][x_sink].mean(0) if x_sink.any() else c_first
        rows[str(k)] = {
            "n": n,
            "j": j,
            "small_norm_threshold": x_thr,
            "small_sinks": int(x_sink.sum()),
            "large_sinks": int(y_sink.sum()),
            "sinks_in_both": int((x_sink & y_sink).sum()),
            "first_position_large_norm_mean": float(y_norm[first].mean()),
            "cosine_first_vs_later_sinks": float(torch.nn.functional.cosine_similarity(c_first, c_sink, dim=0)),
            "calibration_tokens": int(len(first)),
        }
        plans[k] = (w, c_first, c_sink, x_thr)
        log(f"  stitch {k} {(n, j)}: {json.dumps(rows[str(k)])}")
    key_of = {palette.config.stitch_layer_key(k): k for k in hybrids}
    if len(key_of) != len(hybrids):
        raise ValueError("diag-sink assumes one hybrid per stitching layer; pass stitches with distinct n.")
    with torch.no_grad():
        for key, k in key_of.items():
            layer, (w, *_rest) = palette.stitch_layers[key], plans[k]
            layer.weight.copy_(w[:-1].T.to(layer.weight.dtype))
            layer.bias.copy_(w[-1].to(layer.bias.dtype))

    def sink_hook(k: int):
        _, c_first, c_sink, threshold = plans[k]

        def hook(module, args, output):
            x = args[0]
            output = output.clone()
            sinks = x.norm(dim=-1) > threshold
            output[sinks] = c_sink.to(output.dtype)
            if output.shape[1] > 1:  # a full window starting at position 0 (no cache in this evaluation)
                output[:, 0] = c_first.to(output.dtype)
            return output

        return hook

    for key, k in key_of.items():
        palette.stitch_layers[key].register_forward_hook(sink_hook(k))
    log("held-out perplexity with sink-aware stitching")
    ppl = text_perplexity(palette, heldout, setting, stitches=hybrids)
    for r in ppl:
        rows[str(r["stitch"])]["heldout_perplexity_sink_aware"] = r["perplexity"]
    return {"stitches": init["stitches"], "rows": rows}


class _NoOpOptimizer(torch.optim.Optimizer):
    """Carries the learning rate schedule for updates that happen inside backward (see `fuse_adafactor`)."""

    def __init__(self, params: list, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:
        return None


def fuse_adafactor(params: list[torch.nn.Parameter], schedule_holder: torch.optim.Optimizer) -> None:
    """Update each parameter with its own Adafactor as soon as its gradient is complete, then free the gradient."""
    from transformers.optimization import Adafactor

    optimizers = {
        p: Adafactor([p], lr=1.0, scale_parameter=False, relative_step=False, warmup_init=False, beta1=None)
        for p in params
    }

    def hook(p: torch.nn.Parameter) -> None:
        opt = optimizers[p]
        opt.param_groups[0]["lr"] = schedule_holder.param_groups[0]["lr"]
        opt.step()
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def run_method(ctx: dict, phase: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from stitched_llama.esta import prepare_esta, trainable_parameters
    from stitched_llama.trainer import REPORT, StitchTrainingArguments
    from stitched_llama.workflow import train_palette

    setting, paths, work = ctx["setting"], ctx["paths"], ctx["work"]
    init = json.loads((ctx["raw"] / "init.json").read_text())
    method, sampling = METHODS[phase]
    tokenizer = AutoTokenizer.from_pretrained(paths["small"])
    palette = reload_palette(paths, init, work, setting)
    check = fingerprint(palette, setting)
    if not all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-2) for a, b in zip(check, init["fingerprint"])):
        raise RuntimeError(f"Reloaded palette differs from the fitted one: {check} vs {init['fingerprint']}")

    needed = setting.steps * setting.batch_size
    train_records = wordnet_subset(ctx["cache"], "train", 2 * needed, setting.seed)
    train = tokenized_examples(train_records, tokenizer, setting.train_max_length)[:needed]
    full = method == "snnet-full"
    fused = full and setting.snnet_optimizer == "adafactor-fused"
    args = StitchTrainingArguments(
        output_dir=str(work / phase),
        method=method,
        sampling=sampling,
        max_steps=setting.steps,
        per_device_train_batch_size=setting.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=setting.lr_full if full else setting.lr_lora,
        lr_scheduler_type="linear",
        warmup_steps=setting.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=0.0 if fused else 1.0,  # fused updates leave no full gradient to clip (Adafactor clips)
        lora_r=setting.lora_r,
        lora_alpha=2 * setting.lora_r,
        num_deployed_stitches=3,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=setting.seed,
        data_seed=setting.seed,
        use_cpu=setting.device == "cpu",
        bf16=setting.amp_bf16,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = prepare_esta(palette, args.esta_config())
    params = trainable_parameters(model)
    optimizers: tuple = (None, None)
    if fused:
        trainable = [p for p in model.parameters() if p.requires_grad]
        holder = _NoOpOptimizer(trainable, args.learning_rate)
        fuse_adafactor(trainable, holder)
        optimizers = (holder, None)

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    log(f"{phase}: {params['trainable']:,} trainable ({params['trainable_percent']:.3f}%), {setting.steps} steps")
    with PeakMemory(setting.device) as memory:  # training, then the merge of the shared LoRA
        trained = train_palette(
            model,
            args,
            Dataset.from_list(train),
            tokenizer=tokenizer,
            callbacks=[StepTimer()],
            save=False,
            optimizers=optimizers,
        )
    trainer, output = trained.trainer, trained.train_output
    log(f"{phase}: trained in {output.metrics['train_runtime']:.0f}s; peak {memory.as_dict()}")
    report = json.loads((Path(args.output_dir) / REPORT).read_text())
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    palette = trained.palette.eval()
    palette.requires_grad_(False)
    data = load_data(ctx["cache"], tokenizer, setting)
    start = time.perf_counter()
    evaluation = evaluate_palette(palette, tokenizer, data, setting, heldout=setting.heldout_after_training)
    result = {
        "method": method,
        "sampling": trainer.sampler.mode,
        "optimizer": setting.snnet_optimizer if full else "adamw",
        "learning_rate": args.learning_rate,
        "max_grad_norm": args.max_grad_norm,
        "steps": trainer.state.global_step,
        "train_examples": len(train),
        "trainable_parameters": params,
        "memory": memory.as_dict(),
        "step_seconds": step_times,
        "train_runtime": output.metrics["train_runtime"],
        "train_loss": output.metrics.get("train_loss"),
        "log_history": losses,
        "stitch_history": trainer.stitch_history,
        "esta_report": report,
        "eval": evaluation,
        "eval_seconds": time.perf_counter() - start,
    }
    if phase == "esta-importance":
        log("transcripts after tuning")
        result["transcripts"] = transcripts(palette, tokenizer, data["transcript_prompts"], setting)
    return result


def run_phase(ctx: dict, phase: str) -> None:
    ctx["raw"].mkdir(parents=True, exist_ok=True)
    info = machine_info(ctx["setting"].device)
    start = time.perf_counter()
    torch.manual_seed(ctx["setting"].seed)
    if phase == "init":
        result = run_init(ctx)
    elif phase in ("diag-pos0", "diag-sink"):
        try:
            result = run_diag_pos0(ctx) if phase == "diag-pos0" else run_diag_sink(ctx)
        except Exception as error:  # a diagnostic must not stop the run
            log(f"{phase} failed: {error!r}")
            result = {"error": repr(error)}
    else:
        result = run_method(ctx, phase)
    result["phase"] = phase
    result["seconds"] = time.perf_counter() - start
    result["machine"] = info
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    result["process_peak_rss_gib"] = process_peak_rss_gib()
    result["setting"] = dataclasses.asdict(ctx["setting"])
    tmp = ctx["raw"] / f".{phase}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, ctx["raw"] / f"{phase}.json")
    log(f"{phase} done in {result['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

LABELS = {
    "init": "LS init (no tuning)",
    "esta-importance": "ESTA, importance sampling",
    "esta-uniform": "ESTA, uniform sampling",
    "snnet-full": "SN-Net direct adaptation",
}


def _frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and perplexity (lower is better on both)."""
    keep = []
    for i, (c, p) in enumerate(points):
        if not any((c2 <= c and p2 <= p) and (c2, p2) != (c, p) for c2, p2 in points):
            keep.append(i)
    return keep


def build_report(out: Path, settings_run: list[str]) -> None:
    sections, transcript_sections = [], []
    for name in settings_run:
        raw = out / "raw" / name
        results = {p: json.loads((raw / f"{p}.json").read_text()) for p in LABELS if (raw / f"{p}.json").exists()}
        diag = raw / "diag-pos0.json"
        diagnostic = json.loads(diag.read_text()) if diag.exists() else None
        sink_file = raw / "diag-sink.json"
        sink = json.loads(sink_file.read_text()) if sink_file.exists() else None
        if "init" not in results:
            continue
        summary = summarize(results, diagnostic, sink)
        (out / f"pareto_{name}.json").write_text(json.dumps(summary, indent=1))
        plot(summary, out / f"pareto_{name}.png", name)
        sections.append(markdown(summary, name))
        transcript_sections.append(transcript_markdown(results, name))
    if not sections:
        raise SystemExit(f"No results under {out / 'raw'}: run the init phase first.")
    (out / "pareto.md").write_text("\n\n".join(sections) + "\n")
    (out / "transcripts.md").write_text("\n\n".join(transcript_sections) + "\n")
    log(f"wrote {out / 'pareto.md'}, {out / 'transcripts.md'} and pareto_*.json/png")


def summarize(results: dict, diagnostic: dict | None = None, sink: dict | None = None) -> dict:
    init = results["init"]
    table = init["stitch_table"]
    summary: dict[str, Any] = {
        "setting": init["setting"],
        "machine": init["machine"],
        "stitches": [
            {k: r[k] for k in ("stitch", "n", "j", "kind", "layers", "params", "flops_per_token")} for r in table
        ],
        "fit_errors": init["fit_errors"],
        "calibration_tokens": init["calibration_tokens"],
        "phases": {},
    }
    for phase, r in results.items():
        ev = r["eval"]
        entry: dict[str, Any] = {
            "seconds": r["seconds"],
            "load_average_1m": [r["machine"]["load_average_1m"], r["load_average_1m_end"]],
            "process_peak_rss_gib": r["process_peak_rss_gib"],
            "wordnet_test_perplexity": [x["perplexity"] for x in ev["wordnet_test"]],
            "wordnet_test_loss": [x["loss"] for x in ev["wordnet_test"]],
            "wordnet_test_tokens": ev["wordnet_test"][0]["tokens"],
            "token_f1": [x["token_f1"] for x in ev["wordnet_generation"]],
        }
        for key, rows in ev.items():
            if key.startswith("heldout_") and not key.endswith("_seconds"):
                entry[f"{key}_perplexity"] = [x["perplexity"] for x in rows]
                entry[f"{key}_tokens"] = rows[0]["tokens"]
        if phase != "init":
            steps = sorted(r["step_seconds"])
            entry.update(
                {
                    "method": r["method"],
                    "sampling": r["sampling"],
                    "optimizer": r["optimizer"],
                    "learning_rate": r["learning_rate"],
                    "max_grad_norm": r["max_grad_norm"],
                    "steps": r["steps"],
                    "train_examples": r["train_examples"],
                    "trainable": r["trainable_parameters"]["trainable"],
                    "trainable_percent": r["trainable_parameters"]["trainable_percent"],
                    "total_parameters": r["trainable_parameters"]["total"],
                    "memory": r["memory"],
                    "median_step_seconds": steps[len(steps) // 2] if steps else None,
                    "mean_step_seconds": sum(steps) / len(steps) if steps else None,
                    "train_runtime": r["train_runtime"],
                    "visits": [row["visits"] for row in r["esta_report"]["stitches"]],
                    "importance": [row["importance"] for row in r["esta_report"]["stitches"]],
                    "deployed": r["esta_report"]["deployed_stitches"],
                    "train_loss_per_stitch": _train_loss_per_stitch(r),
                }
            )
        summary["phases"][phase] = entry
    if diagnostic is not None and "eval" in diagnostic:
        summary["diag_outliers"] = diagnostic.get("outliers")
        summary["diag_pos0"] = {
            "heldout_python_docs_perplexity": [x["perplexity"] for x in diagnostic["eval"]["heldout_python_docs"]],
            "pos0_relative_spread_large": diagnostic["pos0_relative_spread_large"],
            "pos0_relative_gap_stitched": diagnostic["pos0_relative_gap_stitched"],
        }
    if sink is not None and "rows" in sink:
        summary["diag_sink"] = sink["rows"]
    summary["claims"] = check_claims(summary)
    return summary


def _train_loss_per_stitch(r: dict) -> list[float | None]:
    sums: dict[int, list[float]] = {}
    for entry in r["log_history"]:
        for key, value in entry.items():
            m = re.fullmatch(r"stitch_(\d+)/loss", key)
            if m:
                sums.setdefault(int(m.group(1)), []).append(value)
    n = len(r["esta_report"]["stitches"])
    return [sum(sums[k]) / len(sums[k]) if k in sums else None for k in range(n)]


def check_claims(summary: dict) -> dict:
    claims: dict[str, Any] = {}
    init = summary["phases"]["init"]
    flops = [s["flops_per_token"] for s in summary["stitches"]]
    ppl = init.get("heldout_python_docs_perplexity")
    if ppl:
        small, large = ppl[0], ppl[-1]
        hybrids = ppl[1:-1]
        claims["ls_init_between_anchors"] = all(large <= p <= small for p in hybrids)
        claims["ls_init_monotone_in_cost"] = all(a >= b for a, b in zip(ppl, ppl[1:]))
        claims["ls_init_hybrid_over_small_ratio"] = [p / small for p in hybrids]
        claims["ls_init_worst_ratio"] = max(p / small for p in hybrids) if hybrids else None
    phases = summary["phases"]
    for a, b in (
        ("esta-importance", "snnet-full"),
        ("esta-uniform", "snnet-full"),
        ("esta-importance", "esta-uniform"),
    ):
        if a in phases and b in phases:
            la, lb = phases[a]["wordnet_test_loss"], phases[b]["wordnet_test_loss"]
            fa, fb = phases[a]["token_f1"], phases[b]["token_f1"]
            claims[f"{a}_vs_{b}"] = {
                "stitches_lower_loss": sum(x <= y for x, y in zip(la, lb)),
                "stitches": len(la),
                "mean_loss": [sum(la) / len(la), sum(lb) / len(lb)],
                "mean_token_f1": [sum(fa) / len(fa), sum(fb) / len(fb)],
                "frontier": [
                    _frontier(list(zip(flops, phases[a]["wordnet_test_perplexity"]))),
                    _frontier(list(zip(flops, phases[b]["wordnet_test_perplexity"]))),
                ],
            }
    return claims


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (x >= 1e4 or math.isinf(x)):
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def markdown(summary: dict, name: str) -> str:
    s, m = summary["setting"], summary["machine"]
    phases = summary["phases"]
    total = next((e["total_parameters"] for e in phases.values() if "total_parameters" in e), 0)
    total = total or summary["stitches"][0]["params"] + summary["stitches"][-1]["params"]
    init = phases["init"]
    stitches = summary["stitches"]
    lines = [
        f"## Measured Pareto front: Qwen2.5-Coder 0.5B / 1.5B, `{name}` setting",
        "",
        "Produced by `python benchmarks/bench_pareto.py --setting "
        f"{name}` (raw numbers in `docs/results/pareto_{name}.json` and `docs/results/raw/{name}/`).",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; device `{s['device']}`; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        "- Other jobs shared the machine during this run (1-minute load average at start/end of each phase: "
        + ", ".join(f"{p} {v['load_average_1m'][0]}/{v['load_average_1m'][1]}" for p, v in phases.items())
        + "); times are wall-clock under that load.",
        f"- Dtype: fp32 weights{', bf16 autocast' if s['amp_bf16'] else ', no autocast'}. "
        "Anchors: dequantized GGUF weights (0.5B from Q4_K_M, 1.5B from the packaged GGUF), untied embeddings.",
        f"- Palette: {len(stitches)} stitches (both anchors + {len(stitches) - 2} hybrids of the default palette, "
        "spread over the cost range); stitching layers shared per small-anchor cut `n`.",
        f"- LS init: {summary['calibration_tokens']} calibration tokens of python_docs_calib "
        f"({s['calib_tokens'] // s['calib_len']} windows x {s['calib_len']}), ridge 1e-2, first position of each "
        "window excluded (library default).",
        f"- Held-out text: {s['heldout_seqs']} windows x {s['heldout_len']} tokens spread over each file, every "
        "position but the first predicted.",
        f"- Fine-tuning: WordNet train records (seeded shuffle, records longer than {s['train_max_length']} tokens "
        f"skipped), batch {s['batch_size']}, {s['steps']} optimizer steps per method, linear schedule with "
        f"{s['warmup_steps']} warm-up steps, seed {s['seed']}, same examples in the same order for every method. "
        f"ESTA: LoRA r={s['lora_r']} alpha={2 * s['lora_r']} on q/k/v/o of both anchors and on the stitching layers "
        f"+ stitch-specific biases, AdamW lr {s['lr_lora']}, grad clip 1.0. SN-Net: every anchor and stitching-layer "
        f"weight trainable, uniform sampling, lr {s['lr_full']}, optimizer `{s['snnet_optimizer']}`"
        + (
            " (Adafactor without first moment, update clipping 1.0, applied per parameter during backward and the "
            f"gradient freed at once: fp32 AdamW would need 16 bytes x {total / 1e9:.2f}B parameters = "
            f"{16 * total / 1e9:.0f} GB for weights, gradients and moments, more than this machine has)"
            if s["snnet_optimizer"] == "adafactor-fused"
            else ""
        )
        + ".",
        f"- WordNet test: {init['wordnet_test_tokens']} response tokens from {s['eval_examples']} test records "
        f"(loss on the response and its end-of-turn token); token F1: greedy answers (at most "
        f"{s['max_new_tokens']} new tokens) to {s['gen_examples']} of those prompts vs the reference gloss "
        "(SQuAD-style bag of words).",
        "",
    ]
    ppl = init.get("heldout_python_docs_perplexity")
    diag = summary.get("diag_pos0")
    if ppl:
        lines += [
            "### (a) After least-squares init, before tuning: held-out python-docs perplexity",
            "",
            "| stitch | (n, j) | kind | GFLOPs/token | params | P_n fit error | perplexity | / small anchor |"
            + (" with position 0 -> large's constant (diagnostic) | position-0 gap after P_n |" if diag else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if diag else ""),
        ]
        for i, (st, p) in enumerate(zip(stitches, ppl)):
            err = summary["fit_errors"].get(str(st["n"])) if st["kind"] == "hybrid" else None
            row = (
                f"| {st['stitch']} | ({st['n']}, {st['j']}) | {st['kind']} | {st['flops_per_token'] / 1e9:.2f} | "
                f"{st['params'] / 1e9:.3f}B | {_fmt(err, 3)} | {_fmt(p)} | {_fmt(p / ppl[0])} |"
            )
            if diag:
                hybrid = st["kind"] == "hybrid"
                fixed = diag["heldout_python_docs_perplexity"][i]
                gap = diag["pos0_relative_gap_stitched"].get(str(i))
                row += f" {_fmt(fixed) if hybrid else '-'} | {_fmt(gap, 2) if hybrid else '-'} |"
            lines.append(row)
        lines.append("")
        if diag:
            spread = ", ".join(f"j={j}: {v:.3f}" for j, v in diag["pos0_relative_spread_large"].items())
            lines += [
                "Diagnostic (`--phases diag-pos0`, not a library feature): position 0 after the stitching layer "
                "replaced by the large anchor's mean position-0 state entering layer j (mean over the calibration "
                "windows' first tokens). How much the large anchor's position-0 state varies with the token (mean "
                f"relative distance to that mean): {spread}; 'position-0 gap after P_n' is the relative distance "
                "between what the LS-fitted P_n produces at position 0 and the large anchor's own state there.",
                "",
            ]
    outliers = (summary.get("diag_outliers") or {}).get("stitches")
    if outliers:
        lines += [
            "Diagnostic (`--phases diag-pos0`): do tokens with huge hidden-state norms past position 0 dominate the "
            f"fit? Refitted on {summary['diag_outliers']['calibration_tokens']} of the calibration tokens; "
            "'outliers' are tokens whose target norm (large anchor entering layer j) exceeds 5x the median; errors "
            "are relative (||XW - Y|| / ||Y||) on the held-out windows; the last column is the held-out perplexity "
            "with P_n refitted without the outlier tokens (not a library feature).",
            "",
            "| stitch | (n, j) | target norm median / p99 / max | outlier share | top-1% share of sum sq | "
            "library fit: error all / ordinary / outliers | outlier-free fit: error ordinary / outliers | "
            "perplexity, library fit | perplexity, outlier-free fit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, r in outliers.items():
            lines.append(
                f"| {k} | ({r['n']}, {r['j']}) | {r['target_norm_median']:.1f} / {r['target_norm_p99']:.1f} / "
                f"{r['target_norm_max']:.1f} | {100 * r['outlier_share_calibration']:.2f}% | "
                f"{100 * r['sum_sq_share_top1pct']:.1f}% | {_fmt(r['heldout_err_library_fit'], 3)} / "
                f"{_fmt(r['heldout_err_library_fit_ordinary'], 3)} / {_fmt(r['heldout_err_library_fit_outliers'], 3)} | "
                f"{_fmt(r['heldout_err_outlier_free_fit_ordinary'], 3)} / "
                f"{_fmt(r['heldout_err_outlier_free_fit_outliers'], 3)} | {_fmt(ppl[int(k)]) if ppl else 'n/a'} | "
                f"{_fmt(r.get('heldout_perplexity_outlier_free_fit'))} |"
            )
        tokens = sorted({t for r in outliers.values() for t in r["outlier_tokens_heldout"]})[:40]
        lines += ["", f"Outlier tokens seen in the held-out windows: {json.dumps(tokens)}", ""]
    sink = summary.get("diag_sink")
    if sink:
        lines += [
            "Diagnostic (`--phases diag-sink`, not a library feature): sink-aware stitching. Tokens whose small-anchor "
            "state norm exceeds 5x the median (the later attention-sink tokens) are mapped to the large anchor's mean "
            "state at those tokens, position 0 to its mean position-0 state, and P_n is refitted on all other tokens "
            "(library objective and ridge, all calibration windows). Held-out python-docs perplexity:",
            "",
            "| stitch | (n, j) | library LS | sink-aware | / small anchor | later sinks in calibration (small / large "
            "/ both) | cosine(position-0 state, later-sink state) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r in sink.items():
            value = r.get("heldout_perplexity_sink_aware")
            lines.append(
                f"| {k} | ({r['n']}, {r['j']}) | {_fmt(ppl[int(k)]) if ppl else 'n/a'} | {_fmt(value)} | "
                f"{_fmt(value / ppl[0]) if value and ppl else 'n/a'} | {r['small_sinks']} / {r['large_sinks']} / "
                f"{r['sinks_in_both']} | {_fmt(r['cosine_first_vs_later_sinks'], 3) if r['small_sinks'] else 'n/a'} |"
            )
        lines.append("")
    order = [p for p in LABELS if p in phases]
    lines += [
        "### (b) WordNet test perplexity / token F1 per stitch",
        "",
        "| stitch | (n, j) | GFLOPs/token | " + " | ".join(LABELS[p] for p in order) + " |",
        "|---|---|---|" + "---|" * len(order),
    ]
    for i, st in enumerate(stitches):
        cells = [f"{_fmt(phases[p]['wordnet_test_perplexity'][i])} / {phases[p]['token_f1'][i]:.3f}" for p in order]
        lines.append(
            f"| {st['stitch']} | ({st['n']}, {st['j']}) | {st['flops_per_token'] / 1e9:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    trained = [p for p in order if p != "init"]
    if trained:
        lines += [
            "### (c) Cost of each method",
            "",
            "| method | trainable params | trainable % | peak RSS during training | RSS before training | "
            "peak CUDA | median s/step | mean s/step | train loss | stitch visits | deployed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in trained:
            e = phases[p]
            mem = e["memory"]
            lines.append(
                f"| {LABELS[p]} (`{e['optimizer']}`, lr {e['learning_rate']}) | {e['trainable']:,} | "
                f"{e['trainable_percent']:.3f} | {mem['peak_rss_gib']:.2f} GiB | {mem['rss_before_gib']:.2f} GiB | "
                f"{_fmt(mem['peak_cuda_allocated_gib'])} | {_fmt(e['median_step_seconds'], 1)} | "
                f"{_fmt(e['mean_step_seconds'], 1)} | "
                f"{_fmt(sum(e['wordnet_test_loss']) / len(e['wordnet_test_loss']), 3)} (test, mean) | "
                f"{e['visits']} | {e['deployed']} |"
            )
        lines.append("")
    lines += ["### Claim checks (computed)", "", "```json", json.dumps(summary["claims"], indent=1), "```", ""]
    lines.append(f"![Pareto plot](pareto_{name}.png)")
    return "\n".join(lines)


def transcript_markdown(results: dict, name: str) -> str:
    init = results["init"]
    prompts = init["transcript_prompts"]
    table = {r["stitch"]: r for r in init["stitch_table"]}
    lines = [
        f"## Chat transcripts, `{name}` setting",
        "",
        "Greedy decoding, Qwen chat template (default system prompt), at most "
        f"{init['setting']['transcript_new_tokens']} new tokens: answers may stop mid-sentence. 'Before' is the "
        "least-squares-initialised palette; 'after' is the same palette after the ESTA importance-sampling run "
        "(LoRA merged, stitch biases kept). Real outputs, unedited.",
        "",
    ]
    after = results.get("esta-importance", {}).get("transcripts")
    for i, prompt in enumerate(prompts):
        lines += [f"### Prompt {i + 1}: {prompt}", ""]
        ref = init["transcript_references"].get(prompt)
        if ref:
            lines += [f"WordNet reference gloss: *{ref}*", ""]
        for j, row in enumerate(init["transcripts"]):
            st = table[row["stitch"]]
            head = (
                f"**stitch {st['stitch']} ({st['n']}, {st['j']}), {st['kind']}, "
                f"{st['flops_per_token'] / 1e9:.2f} GFLOPs/token**"
            )
            lines += [head, "", "before tuning:", *_fence(row["answers"][i])]
            if after:
                lines += ["after tuning:", *_fence(after[j]["answers"][i])]
    return "\n".join(lines)


def _fence(text: str) -> list[str]:
    """The answer verbatim in a tilde-fenced block (answers contain backtick fences of their own)."""
    return ["~~~text", text.replace("~~~", "~ ~ ~") if text else "(empty answer)", "~~~", ""]


def plot(summary: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [s["flops_per_token"] / 1e9 for s in summary["stitches"]]
    phases = summary["phases"]
    panels = [("heldout_python_docs_perplexity", "python-docs held-out perplexity (LS init)", ["init"])]
    panels.append(("wordnet_test_perplexity", "WordNet test perplexity", [p for p in LABELS if p in phases]))
    panels.append(("token_f1", "WordNet token F1 (higher is better)", [p for p in LABELS if p in phases]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (key, title, keys) in zip(axes, panels):
        for p in keys:
            values = phases[p].get(key)
            if not values:
                continue
            (line,) = ax.plot(flops, values, "o-", label=LABELS[p])
            ax.plot([flops[0], flops[-1]], [values[0], values[-1]], "*", ms=14, color=line.get_color())
        ax.set_xlabel("GFLOPs / token")
        ax.set_title(title)
        if key != "token_f1":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if summary.get("diag_sink"):
        values = [summary["diag_sink"].get(str(k), {}).get("heldout_perplexity_sink_aware") for k in range(len(flops))]
        axes[0].plot(flops[1:-1], values[1:-1], "s:", label="sink-aware stitching (diagnostic)")
        axes[0].legend(fontsize=8)
    if summary.get("diag_pos0"):
        values = summary["diag_pos0"]["heldout_python_docs_perplexity"]
        axes[0].plot(flops[1:-1], values[1:-1], "x--", label="LS init, position 0 -> large constant (diagnostic)")
        axes[0].legend(fontsize=8)
    axes[0].annotate("stars: anchors", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8)
    fig.suptitle(f"Qwen2.5-Coder 0.5B -> 1.5B palette, {name} setting ({summary['setting']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="reduced")
    parser.add_argument("--cache-dir", default=None, help="where prepare_anchors/prepare_data wrote their outputs")
    parser.add_argument("--out", default="docs/results", help="folder for JSON, PNG and markdown results")
    parser.add_argument(
        "--stitches", default=None, help="hybrids as 'n:j,n:j' (anchors always added), 'all', or default 'auto'"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (overrides the setting)")
    parser.add_argument("--device", default=None, help="cpu or cuda (overrides the setting)")
    parser.add_argument("--snnet-optimizer", choices=["adamw", "adafactor-fused"], default=None)
    parser.add_argument(
        "--phases", default=",".join(DEFAULT_PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--no-map-first-token", action="store_true", help="plain least-squares stitches (no first-token mapping)"
    )
    parser.add_argument("--force", action="store_true", help="rerun phases whose results exist")
    parser.add_argument("--work-dir", default=None, help="scratch (stitching layers, trainer output)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in-process
    args = parser.parse_args(argv)

    setting = dataclasses.replace(SETTINGS[args.setting])
    if args.steps is not None:
        setting.steps = args.steps
    if args.device is not None:
        setting.device = args.device
        if args.device == "cpu":
            setting.amp_bf16 = False
    if args.snnet_optimizer is not None:
        setting.snnet_optimizer = args.snnet_optimizer
    setting.map_first_token = not args.no_map_first_token
    stitches = parse_stitches(args.stitches)
    cache = resolve_cache_dir(args.cache_dir)
    if stitches == []:  # "all": the default palette
        setting.num_hybrids = None
        stitches = None
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else cache / "bench_pareto" / args.setting
    ctx = {
        "setting": setting,
        "cache": cache,
        "paths": {
            "small": cache / QWEN_SMALL_DIR,
            "large": cache / QWEN_LARGE_DIR,
            "calib": cache / TEXT_DIR / "python_docs_calib.txt",
        },
        "stitches": stitches,
        "work": work,
        "raw": out / "raw" / args.setting,
    }
    if args.phase is not None:
        run_phase(ctx, args.phase)
        return

    missing = [str(p) for p in ctx["paths"].values() if not p.exists()]
    if missing:
        raise SystemExit(f"Missing {missing}: run benchmarks/prepare_anchors.py and benchmarks/prepare_data.py first.")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"Unknown phases {sorted(unknown)}: choose among {', '.join(PHASES)}.")
    for phase in phases:
        if phase == "report":
            continue
        if (ctx["raw"] / f"{phase}.json").exists() and not args.force:
            log(f"{phase}: results exist, skipped (--force reruns)")
            continue
        if phase != "init" and not (ctx["raw"] / "init.json").exists():
            raise SystemExit("Run the init phase first: the methods start from its stitching layers.")
        log(f"running phase {phase}")
        passthrough = _strip_phases(argv if argv is not None else sys.argv[1:])
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--phase", phase]
        subprocess.run(cmd, check=True)
    if "report" in phases:
        build_report(out, sorted(d.name for d in (out / "raw").iterdir() if d.is_dir()))


def _strip_phases(argv: list[str]) -> list[str]:
    """The command line without `--phases X` / `--phases=X` / `--force` (the parent handles those)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--phases":
            skip = True
            continue
        if a.startswith("--phases=") or a == "--force":
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()

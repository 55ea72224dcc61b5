"""Per-stitch measurements: perplexity and loss through `stitched_llama.evaluation`, greedy answers and their token
F1, transcripts."""

from __future__ import annotations

import copy
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .measure import log
from .settings import Setting

ROW_KEYS = ("stitch", "loss", "perplexity", "tokens")  # what the raw JSON keeps of a library row


def autocast(setting: Setting):
    if setting.amp_bf16:
        return torch.autocast(device_type=setting.device, dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@torch.no_grad()
def fingerprint(palette: Any, setting: Setting) -> list[float]:
    """Logit sums of every stitch on a fixed input: the reloaded palette must match the fitted one."""
    ids = torch.arange(1000, 1016, device=palette.device).unsqueeze(0) % palette.config.vocab_size
    out = []
    for k in range(palette.num_stitches):
        with autocast(setting):
            out.append(float(palette(input_ids=ids, stitch=k, use_cache=False).logits.float().sum()))
    return out


def _library_rows(
    palette: Any, examples: list[dict], setting: Setting, stitches: Sequence[int] | str, label: str, **kwargs
) -> list[dict]:
    from stitched_llama.evaluation import evaluate_palette

    start = time.perf_counter()
    with autocast(setting):
        rows = evaluate_palette(palette, examples, stitches=stitches, progress=False, **kwargs)
    for r in rows:
        log(f"  stitch {r['stitch']}: {label} {r['perplexity']:.2f}")
    log(f"  ({time.perf_counter() - start:.0f}s)")
    return [{key: r[key] for key in ROW_KEYS} for r in rows]


def text_perplexity(
    palette: Any, chunks: torch.LongTensor, setting: Setting, stitches: Sequence[int] | str = "all"
) -> list[dict]:
    """Per-stitch next-token perplexity on fixed windows `[windows, seq]` (every position but the first is
    predicted)."""
    examples = [{"input_ids": window} for window in chunks]  # no labels: every token scored
    return _library_rows(palette, examples, setting, stitches, "perplexity", batch_size=4)


def instruction_loss(palette: Any, examples: list[dict], tokenizer: Any, setting: Setting) -> list[dict]:
    """Per-stitch mean loss over response tokens (token-weighted) of tokenized WordNet examples."""
    from stitched_llama.data import collate_fn

    collator = collate_fn(tokenizer)
    return _library_rows(
        palette,
        examples,
        setting,
        "all",
        "WordNet test perplexity",
        batch_size=setting.eval_batch_size,
        collator=collator,
    )


@torch.no_grad()
def generate(palette: Any, tokenizer: Any, prompts: list[str], stitch: int, max_new_tokens: int, setting: Setting):
    """Greedy answers of one stitch to chat prompts, batched with left padding."""
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
    picks: list[int] = []
    for frac in (1 / 3, 2 / 3):
        candidates = [k for k in hybrids if k not in picks]
        if candidates:  # a palette with a single hybrid has one to show
            picks.append(min(candidates, key=lambda k: abs(flops[k] - (lo + frac * (hi - lo)))))
    return [0, *sorted(picks), palette.num_stitches - 1]


def transcripts(palette: Any, tokenizer: Any, prompts: list[str], setting: Setting) -> list[dict]:
    rows = []
    for k in transcript_stitches(palette):
        answers = generate(palette, tokenizer, prompts, k, setting.transcript_new_tokens, setting)
        rows.append({"stitch": k, "answers": answers})
    return rows


def evaluate_all(palette: Any, tokenizer: Any, data: dict, setting: Setting, heldout: bool) -> dict:
    """Held-out perplexity (if `heldout`), WordNet test loss and greedy-generation token F1 of every stitch."""
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

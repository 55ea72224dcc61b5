"""Pretrain a small LLaMA family on the offline corpus: the fast testbed and the demo's built-in anchors.

One BPE tokenizer (trained with ``tokenizers``) and two LLaMA sizes, trained alike with Transformers' own
``Trainer`` on the same token stream in the same order (SN-Net's setting: a family trained alike):

* Python documentation (``text/python_docs_calib.txt``: never the held-out files),
* Shakespeare (``text/shakespeare_train.txt``: plays the held-out text does not use),
* WordNet glosses of the *train* words, as ``word: gloss`` lines.

Weights are saved in bfloat16 (``--save-dtype``) to keep the committed family small; load them in float32 to train.
``prepare_data.py`` must have run first. Usage::

    python benchmarks/pretrain_family.py --out stitched_llama/assets/family --minutes 45

Progress goes to stdout; ``<out>/pretraining.json`` gets each size's losses, tokens and time as it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from stitched_llama.data import tokenize_texts

try:  # run as a script (benchmarks/ is on sys.path) ...
    from _paths import TEXT_DIR, WORDNET_DIR, resolve_cache_dir
except ImportError:  # ... or as ``python -m benchmarks.pretrain_family``
    from benchmarks._paths import TEXT_DIR, WORDNET_DIR, resolve_cache_dir

EOS = "<|endoftext|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|endoftext|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# (name, hidden, layers, heads, kv heads): 0.39M and 3.15M parameters outside the embeddings.
SIZES = {
    "small": (96, 4, 3, 1),
    "large": (192, 8, 6, 2),
}


def log(msg: str) -> None:
    print(f"[pretrain_family {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus(cache_dir: Path, max_chars: int) -> list[str]:
    """The training documents, each source capped at ``max_chars``."""
    text = cache_dir / TEXT_DIR
    docs = []
    for name in ("python_docs_calib.txt", "shakespeare_train.txt"):
        body = (text / name).read_text(encoding="utf-8")[:max_chars]
        docs += [d for d in body.split("\n\n\n") if d.strip()]
    glosses, total = [], 0
    with open(cache_dir / WORDNET_DIR / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            word = record["instruction"].split('"')[1]
            glosses.append(f"{word}: {record['output']}")
            total += len(glosses[-1]) + 1
            if total > max_chars:
                break
    docs += ["\n".join(glosses[i : i + 50]) for i in range(0, len(glosses), 50)]
    return docs


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLES)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    return tokenizer


def blocks(docs: list[str], tokenizer: PreTrainedTokenizerFast, block: int, seed: int) -> Dataset:
    """One stream (documents joined by EOS) cut into ``block``-token rows, shuffled once with ``seed``."""
    rows = list(tokenize_texts(docs, tokenizer, block_size=block, drop_last=True)["input_ids"])
    random.Random(seed).shuffle(rows)  # the order the committed family was trained in
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def heldout(cache_dir: Path, tokenizer: PreTrainedTokenizerFast, block: int, n_rows: int) -> Dataset:
    body = (cache_dir / TEXT_DIR / "python_docs_heldout.txt").read_text(encoding="utf-8")
    rows = list(tokenize_texts([body], tokenizer, block_size=block, drop_last=True)["input_ids"])[:n_rows]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def write_demo_text(cache_dir: Path, out: Path, train_chars: int = 400_000, heldout_chars: int = 100_000) -> None:
    """The text `stitched-llama demo` trains and evaluates on, shipped with the family: training text the family
    saw (healing a palette uses generic text), and held-out Python docs it never saw."""
    text = cache_dir / TEXT_DIR
    half = train_chars // 2
    train = [
        (text / name).read_text(encoding="utf-8")[:half] for name in ("python_docs_calib.txt", "shakespeare_train.txt")
    ]
    heldout = (text / "python_docs_heldout.txt").read_text(encoding="utf-8")[:heldout_chars]
    folder = out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n\n\n".join(t[: t.rfind("\n\n")] for t in train) + "\n", encoding="utf-8")
    (folder / "heldout.txt").write_text(heldout[: heldout.rfind("\n\n")] + "\n", encoding="utf-8")


class Progress(TrainerCallback):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            log(f"{self.name} step {state.global_step}/{state.max_steps}: {json.dumps(logs)}")


def build(name: str, vocab_size: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    hidden, layers, heads, kv = SIZES[name]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=None, help="where prepare_data.py wrote text/ and wordnet/")
    p.add_argument("--out", default="stitched_llama/assets/family")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block", type=int, default=256, help="tokens per training row")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per size (same rows, same order)")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--max-chars", type=int, default=1_500_000, help="cap on each source")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dir = resolve_cache_dir(args.cache_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    write_demo_text(cache_dir, out)
    docs = corpus(cache_dir, args.max_chars)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(docs, args.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens, trained on {len(docs)} documents in {time.perf_counter() - t0:.0f} s")
    train = blocks(docs, tokenizer, args.block, args.seed)
    val = heldout(cache_dir, tokenizer, args.block, n_rows=64)
    tokens_per_step = args.batch_size * args.block
    epochs = args.steps * args.batch_size / len(train)
    log(
        f"data: {len(train)} rows of {args.block} tokens ({len(train) * args.block / 1e6:.2f} M tokens); "
        f"{args.steps} steps x {tokens_per_step} tokens = {args.steps * tokens_per_step / 1e6:.2f} M tokens "
        f"({epochs:.2f} epochs); held-out: {len(val)} rows of Python docs"
    )
    report_path = out / "pretraining.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out")}
    report["data"] = {"train_rows": len(train), "train_tokens": len(train) * args.block, "heldout_rows": len(val)}
    for name in args.sizes:
        model = build(name, len(tokenizer), tokenizer.eos_token_id, args.seed)
        n_body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        log(
            f"{name}: {n_body / 1e6:.2f} M parameters outside the embeddings, {model.num_parameters() / 1e6:.2f} M in all"
        )
        targs = TrainingArguments(
            output_dir=str(out / f".run-{name}"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=max(1, args.steps // 30),
            eval_strategy="steps",
            eval_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            data_seed=args.seed,
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=train,
            eval_dataset=val,
            data_collator=default_data_collator,
            callbacks=[Progress(name)],
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        final = trainer.evaluate()
        log(
            f"{name}: held-out loss {final['eval_loss']:.3f} (ppl {math.exp(final['eval_loss']):.1f}) in {seconds:.0f} s"
        )
        model.generation_config.max_length = None
        model.to(getattr(torch, args.save_dtype)).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        history = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
        report[name] = {
            "config": dict(zip(("hidden", "layers", "heads", "kv_heads"), SIZES[name])),
            "non_embedding_parameters": n_body,
            "parameters": model.num_parameters(),
            "train_seconds": round(seconds),
            "heldout_loss": final["eval_loss"],
            "history": history,
        }
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    log("done")


if __name__ == "__main__":
    main()

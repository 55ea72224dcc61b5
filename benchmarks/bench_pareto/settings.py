"""The benchmark's settings (one base, the others `dataclasses.replace`d from it), its phases, and where its inputs
and outputs live."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks._paths import QWEN_LARGE_DIR, QWEN_SMALL_DIR, TEXT_DIR, WORDNET_DIR

METHODS = {  # phase -> (StitchTrainingArguments.method, sampling)
    "esta-importance": ("esta", "importance"),
    "esta-uniform": ("esta", "uniform"),
    "snnet-full": ("snnet-full", "uniform"),
}
DIAGNOSTICS = ("diag-pos0", "diag-sink")
PHASES = ("init", *METHODS, *DIAGNOSTICS, "report")
DEFAULT_PHASES = ("init", *METHODS, "report")  # the diagnostics are optional
ANCHORS = {  # --anchors -> (name in the report, where the weights come from)
    "qwen": (
        "Qwen2.5-Coder 0.5B / 1.5B",
        "dequantized GGUF weights (0.5B from Q4_K_M, 1.5B from the packaged GGUF), untied embeddings",
    ),
    "family": ("built-in family small / large", "stitched_llama/assets/family (benchmarks/pretrain_family.py)"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A run's knobs; the defaults are the `reduced` setting, the base of the others."""

    device: str = "cpu"
    amp_bf16: bool = False  # bf16 autocast for training and evaluation (weights stay fp32)
    num_hybrids: int | None = 5  # hybrids spread over the cost range; None = every stitch of the default palette
    calib_tokens: int = 8192
    calib_len: int = 256
    heldout_seqs: int = 8
    heldout_len: int = 256
    heldout_texts: tuple[str, ...] = ("python_docs",)
    heldout_after_training: bool = False
    train_max_length: int = 64
    batch_size: int = 2
    steps: int = 40
    warmup_steps: int = 4
    lr_lora: float = 5e-4
    lr_full: float = 2e-5
    lora_r: int = 8
    eval_examples: int = 24
    eval_batch_size: int = 8
    gen_examples: int = 8
    max_new_tokens: int = 24
    transcript_new_tokens: int = 40
    snnet_optimizer: str = "adafactor-fused"  # or "adamw"
    map_first_token: bool = True  # from_anchors' first-token mapping (off: the plain least-squares stitch)
    anchors: str = "qwen"  # a key of ANCHORS
    seed: int = 0


REDUCED = Setting()
SETTINGS = {
    "reduced": REDUCED,
    # A few minutes' check that every code path runs, on the built-in family (not a measurement).
    "smoke": dataclasses.replace(
        REDUCED,
        anchors="family",
        num_hybrids=2,
        calib_tokens=1024,
        heldout_seqs=2,
        heldout_len=32,
        batch_size=1,
        steps=3,
        warmup_steps=1,
        eval_examples=2,
        eval_batch_size=2,
        gen_examples=2,
        max_new_tokens=4,
        transcript_new_tokens=4,
    ),
    "full": dataclasses.replace(
        REDUCED,
        device="cuda",
        amp_bf16=True,
        num_hybrids=None,
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
        eval_examples=512,
        eval_batch_size=32,
        gen_examples=128,
        max_new_tokens=48,
        transcript_new_tokens=96,
        snnet_optimizer="adamw",
    ),
}


@dataclasses.dataclass(frozen=True)
class Sources:
    """The files a run reads."""

    small: Path
    large: Path
    calib: Path
    heldout: dict[str, Path]  # name in the report -> text file
    wordnet: Path  # folder of {train,test}.jsonl

    def missing(self) -> list[str]:
        paths = [self.small, self.large, self.calib, *self.heldout.values(), self.wordnet / "test.jsonl"]
        return [str(p) for p in paths if not p.exists()]


def sources(setting: Setting, cache: Path) -> Sources:
    """The Qwen anchors and texts of the cache, or the built-in family with its own text (python_docs held out)."""
    heldout = {name: cache / TEXT_DIR / f"{name}_heldout.txt" for name in setting.heldout_texts}
    if setting.anchors == "family":
        from stitched_llama.demo import FAMILY

        if "python_docs" in heldout:  # the family's held-out text is Python documentation it never saw
            heldout["python_docs"] = FAMILY / "text" / "heldout.txt"
        return Sources(FAMILY / "small", FAMILY / "large", FAMILY / "text" / "train.txt", heldout, cache / WORDNET_DIR)
    return Sources(
        cache / QWEN_SMALL_DIR,
        cache / QWEN_LARGE_DIR,
        cache / TEXT_DIR / "python_docs_calib.txt",
        heldout,
        cache / WORDNET_DIR,
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """What every phase reads: the setting, its inputs, and where it writes."""

    setting: Setting
    cache: Path
    sources: Sources
    stitches: list[tuple[int, int]] | None  # None: chosen by the setting
    work: Path  # scratch: stitching layers, trainer output
    raw: Path  # one JSON per phase

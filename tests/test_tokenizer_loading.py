"""The tokenizer saved with a palette loads with `AutoTokenizer` without a remote-code prompt (docs/deploying.md)."""

import os
import subprocess
import sys
import textwrap

import pytest

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.tiny import tiny_anchors, tiny_tokenizer

TEXT = "the palette holds a whole family of models"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = tiny_tokenizer([TEXT])
    small, large = tiny_anchors(len(tokenizer))
    path = tmp_path_factory.mktemp("palette")
    StitchedLlamaForCausalLM.from_anchors(small, large).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer(TEXT)["input_ids"]


def _load_in_a_new_process(folder, first_line: str, kwargs: str, tmp_path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        f"""
        {first_line}
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}{kwargs})
        print("ids", tokenizer({TEXT!r})["input_ids"])
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    # stdin closed: a prompt would read EOF, which Transformers takes as "no", and print its question.
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(
    "first_line, kwargs",
    [
        ("import stitched_llama", ""),  # the package registers the config type: nothing remote to trust
        ('import sys; sys.modules["stitched_llama"] = None', ", trust_remote_code=True"),  # as the model card says
    ],
    ids=["package-imported", "remote-code"],
)
def test_auto_tokenizer_loads_without_a_prompt(folder, first_line, kwargs, tmp_path):
    path, ids = folder
    result = _load_in_a_new_process(path, first_line, kwargs, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    assert f"ids {ids}" in result.stdout

"""lm-evaluation-harness: a palette through `HFLM` in Python and through the `lm_eval` command line."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, build_palette

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local loglikelihood task over a few seeded word sequences, and its data file."""
    root = tmp_path_factory.mktemp("lm_eval")
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        words = [f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (6,), generator=g)]
        rows.append({"context": " ".join(words[:4]), "continuation": " ".join(words[4:])})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "stitch_words.yaml").write_text(
        textwrap.dedent(
            f"""
            task: stitch_words
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {root / "data.jsonl"}
            test_split: test
            output_type: loglikelihood
            doc_to_text: "{{{{context}}}}"
            doc_to_target: " {{{{continuation}}}}"
            metric_list:
              - metric: perplexity
                aggregation: perplexity
                higher_is_better: false
            """
        )
    )
    return root


def palette_loglikelihoods(palette, tokenizer, stitch, rows):
    """Sum of log-probabilities of each continuation given its context, computed by hand."""
    out = []
    for row in rows:
        context = tokenizer(row["context"])["input_ids"]
        target = tokenizer(" " + row["continuation"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logprobs = torch.log_softmax(palette(ids, stitch=stitch).logits[0, :-1], -1)
        out.append(float(sum(logprobs[len(context) - 1 + i, t] for i, t in enumerate(target))))
    return out


def test_hflm_in_python_scores_the_chosen_stitch(tiny_tokenizer, task_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    palette, _ = build_palette("llama")
    palette.set_stitch(1)
    lm = HFLM(pretrained=palette, tokenizer=tiny_tokenizer, backend="causal", batch_size=2)
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    requests = [Instance("loglikelihood", {}, (r["context"], " " + r["continuation"]), i) for i, r in enumerate(rows)]
    scores = [ll for ll, _ in lm.loglikelihood(requests)]
    assert scores == pytest.approx(palette_loglikelihoods(palette, tiny_tokenizer, 1, rows), rel=1e-4)


def test_lm_eval_command_line_on_a_saved_palette(tmp_path, tiny_tokenizer, task_dir):
    palette, _ = build_palette("llama")
    palette.tokenizer = tiny_tokenizer
    palette.save_pretrained(tmp_path / "palette")
    results = {}
    for stitch in (0, 2):
        out = tmp_path / f"results-{stitch}"
        cmd = [
            sys.executable, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={tmp_path / 'palette'},trust_remote_code=True,default_stitch={stitch}",
            "--tasks", "stitch_words", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
            "--output_path", str(out),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        files = list(out.rglob("results_*.json"))
        assert files, result.stdout[-2000:]
        results[stitch] = json.loads(files[0].read_text())["results"]["stitch_words"]["perplexity,none"]
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    for stitch, perplexity in results.items():
        # lm-eval's word perplexity aggregation: exp(-mean log-likelihood per document).
        expected = palette_loglikelihoods(palette, tiny_tokenizer, stitch, rows)
        assert perplexity == pytest.approx(float(torch.tensor(expected).mean().neg().exp()), rel=1e-3)
    assert results[0] != pytest.approx(results[2])

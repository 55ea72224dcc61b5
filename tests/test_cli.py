"""The `stitched-llama` command, run through its installed entry point on tiny anchors saved to disk.

One palette is built (and one trained) per module. Every run pays ~10 s of CPU for importing torch and
transformers, so runs that do not depend on each other go to a small pool as soon as what they need exists (the
error cases during training, the deployment commands together), using the core that a single build or
training run leaves idle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_pair

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.cli import main
from stitched_llama.tiny import tiny_tokenizer

SCRIPT = Path(sys.executable).parent / "stitched-llama"
# One thread per process: the matrices are tiny, and several runs share the cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = ["apple", "river", "stone", "cloud", "seven", "blue", "green", "house"]
RECORDS = [
    {"instruction": f"Repeat the word {w} {n} times.", "input": "", "output": " ".join([w] * n)}
    for w in WORDS
    for n in (2, 3, 4)
]
STITCHES = "1,2;2,3"  # two hybrids: the palette is [small, (2, 3), (1, 2), large]
COMMANDS = ["build", "train", "evaluate", "export", "chat", "demo"]


def cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed: pip install -e .")
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], input=stdin, capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=3) as executor:
        yield executor


def submit(pool: ThreadPoolExecutor, *runs: tuple) -> list[Future]:
    """Start commands (each a tuple of arguments) in the background; `.result()` waits for one."""
    return [pool.submit(cli, *args) for args in runs]


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Two tiny llama anchors (with a word-level chat tokenizer) saved to disk, and data files."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer(r["instruction"] + " " + r["output"] for r in RECORDS)
    for name, anchor in zip(("small", "large"), make_pair("llama")):
        anchor.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:20]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[20:]))
    (root / "text.txt").write_text("\n\n".join(f"the {w} {w} river stone" for w in WORDS))
    return root


@pytest.fixture(scope="module")
def built(ws) -> tuple[Path, str]:
    result = cli(
        "build", ws / "small", ws / "large", "--out", ws / "palette", "--stitches", STITCHES,
        "--calibration", ws / "text.txt", ws / "train.jsonl", "--calibration-records", "16",
    )  # fmt: skip
    return ws / "palette", ok(result)


@pytest.fixture(scope="module")
def error_runs(ws, built, pool) -> list[tuple[tuple, str, Future]]:
    """User errors, each with the message it must print: started in the background while training runs."""
    palette = built[0]
    broken = {name: ws / name for name in ("no-config", "no-weights", "no-tokenizer", "corrupted")}
    for folder in broken.values():
        shutil.copytree(palette, folder)
    (broken["no-config"] / "config.json").unlink()
    (broken["no-weights"] / "model.safetensors").unlink()
    for file in [*broken["no-tokenizer"].glob("tokenizer*"), *broken["no-tokenizer"].glob("chat_template*")]:
        file.unlink()
    with open(broken["corrupted"] / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    out = ws / "never-written"
    cases = [
        (("evaluate", ws / "missing", "--data", ws / "eval.jsonl", "--out", out), "does not exist"),
        (("chat", broken["no-config"]), "has no config.json"),
        (("export", broken["no-weights"], "--stitch", "0", "--out", out), "no weights"),
        (("export", broken["corrupted"], "--stitch", "0", "--out", out), "could not load the palette"),
        (("export", palette, "--stitch", "99", "--out", out), "unknown stitch '99'"),
        (("export", palette, "--stitch", "best", "--max-params=-1", "--out", out), "must be positive"),
        (("export", palette, "--stitch", "best", "--max-latency-ms", "5kg", "--out", out), "unknown unit"),
        (("chat", broken["no-tokenizer"]), "has no tokenizer: save the palette with a tokenizer"),
    ]
    return [(args, message, future) for (args, message), future in zip(cases, submit(pool, *(a for a, _ in cases)))]


@pytest.fixture(scope="module")
def deploy_runs(ws, trained, pool) -> dict[str, Future]:
    """evaluate, export and chat on the trained palette, side by side."""
    palette_dir = trained[0] / "palette"
    eval_dir = ws / "palette-eval"  # --update-palette rewrites its config: keep the trained one intact
    shutil.copytree(palette_dir, eval_dir)
    budget = StitchedLlamaForCausalLM.config_class.from_pretrained(palette_dir).stitch_cost(1).params
    chat = "/stitches\n/stitch 1\nRepeat the word apple 2 times.\n/stitch 99\nRepeat the word stone 3 times.\n"
    runs = {
        "evaluate": ("evaluate", eval_dir, "--data", ws / "eval.jsonl", "--out", ws / "eval", "--update-palette"),
        "evaluate-text": (
            "evaluate", eval_dir, "--data", ws / "text.txt", "--stitches", "0,-1", "--out", ws / "eval-text",
        ),
        "export": ("export", palette_dir, "--stitch", "1", "--out", ws / "export-1"),
        "export-best": (
            "export", palette_dir, "--stitch", "best", "--max-params", str(budget), "--out", ws / "export-best",
        ),
    }  # fmt: skip
    futures = dict(zip(runs, submit(pool, *runs.values())))
    futures["chat"] = pool.submit(cli, "chat", palette_dir, "--max-new-tokens", "4", stdin=chat)  # then EOF
    return futures


@pytest.fixture(scope="module")
def trained(ws, built, error_runs) -> tuple[Path, str]:
    result = cli(
        "train", built[0], "--train-file", ws / "train.jsonl", "--eval-file", ws / "eval.jsonl",
        "--output-dir", ws / "run", "--max-steps", "6", "--per-device-train-batch-size", "4",
        "--learning-rate", "1e-2", "--logging-steps", "3", "--save-strategy", "no", "--report-to", "none",
        "--use-cpu", "--num-deployed-stitches", "2",
    )  # fmt: skip
    return ws / "run", ok(result)


def test_build_prints_table_and_saves_palette(built):
    palette_dir, out = built
    assert "Palette of 4 stitches" in out
    assert "| 1 | (2, 3) | hybrid |" in out and "| 2 | (1, 2) | hybrid |" in out
    assert "fit error per stitching layer" in out and "P_1:" in out and "P_2:" in out
    assert "calibration: 16 sequences" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (palette_dir / name).is_file(), name
    palette = StitchedLlamaForCausalLM.from_pretrained(palette_dir)
    assert [tuple(s) for s in palette.config.stitches] == [(2, 4), (2, 3), (1, 2), (0, 0)]


def test_train_deploys_merges_and_saves(trained):
    run, out = trained
    assert "step 3/6  loss" in out and "step 6/6  loss" in out  # compact progress, one line per log
    assert "deployed stitches: [" in out and f"report in {run / 'esta_report.json'}" in out
    report = json.loads((run / "esta_report.json").read_text())
    assert report["deployed_stitches"][0] == 0 and report["deployed_stitches"][-1] == 3
    assert all("eval_loss" in row for row in report["stitches"])
    palette = StitchedLlamaForCausalLM.from_pretrained(run / "palette")
    assert palette.config.deployed_stitches == report["deployed_stitches"]
    assert not any("lora_" in n for n, _ in palette.named_parameters())
    assert (run / "palette" / "tokenizer.json").is_file()


def test_build_with_search_keeps_the_best_stitch_per_budget(ws):
    result = cli(
        "build", ws / "small", ws / "large", "--out", ws / "searched", "--calibration", ws / "text.txt",
        ws / "train.jsonl", "--calibration-records", "16", "--search", "2", "--search-data", ws / "eval.jsonl", "--skip-blocks", "1",
    )  # fmt: skip
    out = ok(result)
    assert "Search: " in out and "| held-out loss | kept |" in out and "layer skip" in out
    table = [line for line in out.splitlines() if line.startswith("| (")]
    kept = [line for line in table if line.rstrip().endswith("| yes |")]
    palette = StitchedLlamaForCausalLM.from_pretrained(ws / "searched")
    assert len(kept) == palette.num_stitches >= 2 and len(table) > len(kept)
    missing = cli("build", ws / "small", ws / "large", "--out", ws / "never", "--search", "2")
    assert missing.returncode == 2 and "needs --search-data" in missing.stderr


def test_train_on_plain_text_with_distillation(ws, built):
    result = cli(
        "train", built[0], "--text", ws / "text.txt", "--output-dir", ws / "run-text", "--max-steps", "3",
        "--per-device-train-batch-size", "2", "--max-length", "16", "--distill-alpha", "0.5", "--save-strategy",
        "no", "--report-to", "none", "--use-cpu", "--num-deployed-stitches", "1",
    )  # fmt: skip
    out = ok(result)
    assert "evaluating on the training text blocks" in out  # 8 short paragraphs: too few blocks to hold any out
    report = json.loads((ws / "run-text" / "esta_report.json").read_text())
    assert all(math.isfinite(row["eval_loss"]) for row in report["stitches"])
    assert (ws / "run-text" / "palette" / "config.json").is_file()


def test_train_needs_exactly_one_kind_of_data(ws, built):
    both = cli("train", built[0], "--text", ws / "text.txt", "--train-file", ws / "train.jsonl", "--output-dir", ws)
    assert both.returncode == 2 and "pass one of --train-file" in both.stderr


def test_evaluate_writes_report_and_updates_palette(ws, deploy_runs):
    palette_dir = ws / "palette-eval"
    out = ok(deploy_runs["evaluate"].result())
    assert "| stitch | (n, j) |" in out and "Pareto" in out
    for name in ("evaluation.md", "evaluation.csv", "evaluation.json", "pareto.png"):
        assert (ws / "eval" / name).is_file() and str(ws / "eval" / name) in out
    rows = json.loads((ws / "eval" / "evaluation.json").read_text())["stitches"]
    metrics = json.loads((palette_dir / "stitch_report.json").read_text())["metrics"]
    assert "stitch_metrics" not in json.loads((palette_dir / "config.json").read_text())
    assert sorted(metrics) == ["0", "1", "2", "3"]
    assert metrics["2"]["eval_loss"] == pytest.approx(rows[2]["loss"])
    assert metrics["2"]["eval_perplexity"] == pytest.approx(rows[2]["perplexity"])

    out = ok(deploy_runs["evaluate-text"].result())
    assert "plain text" in out
    rows = json.loads((ws / "eval-text" / "evaluation.json").read_text())["stitches"]
    assert [r["stitch"] for r in rows] == [0, 3] and rows[0]["tokens"] == 8 * 4  # 5 words + BOS per paragraph


def test_export_matches_palette_logits(ws, trained, deploy_runs):
    palette_dir = trained[0] / "palette"
    palette = StitchedLlamaForCausalLM.from_pretrained(palette_dir).eval()
    out = ok(deploy_runs["export"].result())
    assert "as StitchedLlamaForCausalLM" in out and "export = " in out and "of the palette" in out
    export_bytes = sum(f.stat().st_size for f in (ws / "export-1").glob("*.safetensors"))
    palette_bytes = sum(f.stat().st_size for f in palette_dir.glob("*.safetensors"))
    assert export_bytes < palette_bytes
    assert f"{export_bytes / palette_bytes:.1%}" in out
    exported = StitchedLlamaForCausalLM.from_pretrained(ws / "export-1").eval()
    ids = torch.tensor([[1, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, palette(ids, stitch=1).logits, rtol=1e-4, atol=1e-5)

    out = ok(deploy_runs["export-best"].result())
    budget = palette.config.stitch_cost(1).params
    chosen = int(out.split("best stitch within")[1].split(": stitch ")[1].split()[0])
    assert palette.config.stitch_cost(chosen).params <= budget
    assert (ws / "export-best" / "config.json").is_file()


def test_chat_commands_and_history(deploy_runs):
    result = deploy_runs["chat"].result()
    out = ok(result)
    assert "chatting with stitch 3 (0, 0), large anchor" in out
    assert "| > | 3 | (0, 0) | large anchor |" in out  # /stitches marks the active stitch
    assert "now chatting with stitch 1 (2, 3), hybrid" in out
    assert out.count("[stitch 1] ") == 2  # both messages answered, by the stitch switched to
    assert "error: unknown stitch '99'" in out  # a bad switch is reported, the chat goes on
    assert "Traceback" not in result.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "stitched-llama 0.1.0"


def test_help_of_every_command(capsys):
    top = ok(cli("--help"))
    assert all(c in top for c in COMMANDS)
    expected = {
        "build": [
            "--calibration",
            "--calibration-records",
            "--stitches",
            "--no-share-stitch-layers",
            "--no-map-first-token",
            "--dtype",
        ],
        "train": [
            "--train-file",
            "--eval-file",
            "--max-length",
            "--output-dir",
            "--max-steps",
            "--sampling",
            "--method",
        ],
        "evaluate": ["--data", "--stitches", "--out", "--update-palette", "pareto.png"],
        "export": ["--stitch", "best", "--max-params", "--max-flops", "--max-latency-ms", "--max-memory-mb"],
        "chat": ["--stitch", "--max-new-tokens", "--system", "/stitches", "/stitch K", "/quit"],
        "demo": ["--out", "--steps", "--seed"],
    }
    # Through `main`, in this process: the entry point itself is exercised above and by every other test, and
    # each run of it costs ~10 s of CPU for importing torch and transformers.
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: stitched-llama {command}"), out[:200]
        for flag in expected[command]:
            assert flag in out, (command, flag)


def test_user_errors_exit_2_with_one_line(ws, error_runs):
    for args, message, future in error_runs:
        result = future.result()
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        errors = [line for line in lines if line.startswith(f"stitched-llama {args[0]}: error: ")]
        assert len(errors) == 1 and message in errors[0], (args, lines)
        # The command's usage comes first, as with argparse's own errors.
        usage = [i for i, line in enumerate(lines) if line.startswith(f"usage: stitched-llama {args[0]}")]
        assert usage and usage[0] < lines.index(errors[0]), (args, lines)
    assert not (ws / "never-written").exists()


def test_train_takes_dashed_and_underscored_flags(tmp_path):
    from stitched_llama.cli.train import train_parser

    values = {
        "output-dir": str(tmp_path),
        "max-steps": "7",
        "per-device-train-batch-size": "3",
        "distill-alpha": "0.25",
    }
    parsed = []
    for separator in ("-", "_"):  # --max-steps as every other command spells it, --max_steps as transformers does
        argv = ["palette", "--train-file", "train.jsonl", f"--use{separator}cpu"]
        argv += [item for flag, value in values.items() for item in (f"--{flag.replace('-', separator)}", value)]
        data, training, rest = train_parser().parse_args_into_dataclasses(args=argv)
        parsed.append(
            (rest.palette_dir, data.train_file, training.output_dir, training.max_steps)
            + (training.per_device_train_batch_size, training.distill_alpha, training.use_cpu)
        )
    assert parsed == [("palette", "train.jsonl", str(tmp_path), 7, 3, 0.25, True)] * 2


def test_train_help_shows_our_options_first_with_dashes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[headings.index("options:") + 1] == "data:", headings  # the first option group is ours

    def position(flag: str) -> int:  # where the option's own line is (the description names flags too)
        return out.index(f"\n  {flag} ")

    assert headings[headings.index("data:") + 1].startswith("training: the stitch options"), headings
    assert position("--train-file") < position("--method") < position("--distill-alpha") < position("--output-dir")
    assert position("--distill-alpha") < position("--adam-beta1")
    assert "\n  --output_dir" not in out and "\n  --max_steps" not in out  # one flag style shown


def test_user_error_prints_the_command_usage_then_the_error(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    runs = {
        "export": ["export", missing, "--stitch", "0", "--out", str(tmp_path / "out")],
        "train": ["train", missing, "--train-file", "train.jsonl", "--output-dir", str(tmp_path / "run"), "--use-cpu"],
    }
    for command, argv in runs.items():
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        usage = [i for i, line in enumerate(lines) if line.startswith(f"usage: stitched-llama {command} ")]
        assert lines[-1].startswith(f"stitched-llama {command}: error: palette folder {missing!r} does not exist")
        assert len(usage) == 1 and usage[0] < len(lines) - 1, lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()

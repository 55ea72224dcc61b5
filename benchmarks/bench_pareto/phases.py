"""The phases that build and tune the palette (`init` and the three methods), and `run_phase`, which runs one phase
and writes its JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .data import calibration_chunks, load_data, tokenized_examples, wordnet_subset
from .diagnostics import run_diag_pos0, run_diag_sink
from .evaluate import evaluate_all, fingerprint, transcripts
from .measure import PeakMemory, log, machine_info, process_peak_rss_gib
from .palette import anchor_kwargs, choose_stitches, reloaded
from .settings import METHODS, Run


def run_init(run: Run) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from stitched_llama import StitchedLlamaForCausalLM

    setting, sources = run.setting, run.sources
    tokenizer = AutoTokenizer.from_pretrained(sources.small)
    stitches = run.stitches
    if stitches is None:
        configs = (AutoConfig.from_pretrained(sources.small), AutoConfig.from_pretrained(sources.large))
        stitches = choose_stitches(*configs, setting.num_hybrids)
    calibration = calibration_chunks(run, tokenizer)
    log(f"building the palette: {len(stitches)} stitches, {calibration.numel()} calibration tokens")
    start = time.perf_counter()
    palette = StitchedLlamaForCausalLM.from_anchors(
        sources.small,
        sources.large,
        stitches=stitches,
        calibration=calibration,
        tokenizer=tokenizer,
        max_length=setting.calib_len,
        batch_size=4,
        map_first_token=setting.map_first_token,
        **anchor_kwargs(setting),
    ).eval()
    build_seconds = time.perf_counter() - start
    log(f"palette built in {build_seconds:.0f}s; fit errors {palette.stitch_fit_errors}")
    log(palette.format_stitch_table())
    run.work.mkdir(parents=True, exist_ok=True)
    stitching = {
        f"{prefix}.{k}": v.detach().float().cpu().contiguous()
        for prefix in ("stitch_layers", "first_token_states")
        for k, v in getattr(palette, prefix).state_dict().items()
    }
    save_file(stitching, run.work / "stitching.safetensors")
    data = load_data(sources, tokenizer, setting)
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
    result["eval"] = evaluate_all(palette, tokenizer, data, setting, heldout=True)
    result["eval_seconds"] = time.perf_counter() - start
    log("transcripts before tuning")
    result["transcripts"] = transcripts(palette, tokenizer, data["transcript_prompts"], setting)
    return result


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


def run_method(run: Run, phase: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from stitched_llama.esta import prepare_esta, trainable_parameters
    from stitched_llama.trainer import REPORT, StitchTrainingArguments
    from stitched_llama.workflow import train_palette

    setting = run.setting
    method, sampling = METHODS[phase]
    init, tokenizer, palette = reloaded(run)
    check = fingerprint(palette, setting)
    if not all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-2) for a, b in zip(check, init["fingerprint"])):
        raise RuntimeError(f"Reloaded palette differs from the fitted one: {check} vs {init['fingerprint']}")

    needed = setting.steps * setting.batch_size
    train_records = wordnet_subset(run.sources, "train", 2 * needed, setting.seed)
    train = tokenized_examples(train_records, tokenizer, setting.train_max_length)[:needed]
    full = method == "snnet-full"
    fused = full and setting.snnet_optimizer == "adafactor-fused"
    args = StitchTrainingArguments(
        output_dir=str(run.work / phase),
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
    data = load_data(run.sources, tokenizer, setting)
    start = time.perf_counter()
    evaluation = evaluate_all(palette, tokenizer, data, setting, heldout=setting.heldout_after_training)
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


def run_phase(run: Run, phase: str) -> None:
    """Run one phase in this process and write `<raw>/<phase>.json` (atomically: a killed run leaves none)."""
    run.raw.mkdir(parents=True, exist_ok=True)
    info = machine_info(run.setting.device)
    start = time.perf_counter()
    torch.manual_seed(run.setting.seed)
    if phase == "init":
        result = run_init(run)
    elif phase in ("diag-pos0", "diag-sink"):
        try:
            result = run_diag_pos0(run) if phase == "diag-pos0" else run_diag_sink(run)
        except Exception as error:  # a diagnostic must not stop the run
            log(f"{phase} failed: {error!r}")
            result = {"error": repr(error)}
    else:
        result = run_method(run, phase)
    result["phase"] = phase
    result["seconds"] = time.perf_counter() - start
    result["machine"] = info
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    result["process_peak_rss_gib"] = process_peak_rss_gib()
    result["setting"] = dataclasses.asdict(run.setting)
    tmp = run.raw / f".{phase}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run.raw / f"{phase}.json")
    log(f"{phase} done in {result['seconds']:.0f}s")

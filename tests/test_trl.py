"""TRL: plain `SFTTrainer` trains the active stitch; `StitchSFTTrainer` trains every stitch with ESTA."""

import pytest
import torch
from conftest import VOCAB, build_palette, record_stitches

trl = pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[trl]'")
from datasets import Dataset  # noqa: E402

from stitched_llama.sft import StitchSFTConfig, StitchSFTTrainer  # noqa: E402


def chats(n=16):
    g = torch.Generator().manual_seed(0)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (k,), generator=g))  # noqa: E731
    return Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": words(5)}, {"role": "assistant", "content": words(4)}]}
            for _ in range(n)
        ]
    )


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + ' </s> ' }}"
        "{% endgeneration %}{% else %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
    )
    return tokenizer


def sft_args(tmp_path, cls=trl.SFTConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, bf16=False,
    )  # fmt: skip
    return cls(**{**defaults, **kwargs})


def test_plain_sft_trainer_trains_the_active_stitch(tmp_path, chat_tokenizer):
    palette, _ = build_palette("llama")
    palette.set_stitch(1)
    ran = tuple(p + "." for p in palette.stitch_module_prefixes(1))
    before = {n: p.detach().clone() for n, p in palette.named_parameters()}
    trainer = trl.SFTTrainer(
        model=palette, args=sft_args(tmp_path), train_dataset=chats(), processing_class=chat_tokenizer
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    moved = {n for n, p in palette.named_parameters() if not torch.equal(p, before[n])}
    # Every weight of stitch 1 moved (SFTTrainer trains the whole model here), and nothing it does not run.
    assert moved == {n for n in before if n.startswith(ran)}
    assert f"stitch_layers.{palette.config.stitch_layer_key(1)}.weight" in moved


def test_stitch_sft_trainer_samples_stitches_with_sfts_data_handling(tmp_path, chat_tokenizer):
    palette, _ = build_palette("llama")
    args = sft_args(
        tmp_path, StitchSFTConfig, max_steps=6, sampling="importance", assistant_only_loss=True, lora_r=4,
        num_deployed_stitches=2,
    )  # fmt: skip
    seen = record_stitches(palette)
    trainer = StitchSFTTrainer(model=palette, args=args, train_dataset=chats(), processing_class=chat_tokenizer)
    trainer.train()
    assert sorted(set(trainer.stitch_history)) == list(range(palette.num_stitches))  # the warm-up visits each
    # Every forward of a step ran its stitch (TRL's fused head runs the palette twice per call: count runs of them).
    calls = [s for s in seen if s is not None]
    runs = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert trainer.stitch_history == [0, 1, 2, 3, 4, 0] and runs == trainer.stitch_history
    assert trainer.sampler.counts == [trainer.stitch_history.count(k) for k in range(palette.num_stitches)]
    assert palette.config.deployed_stitches[0] == 0 and palette.config.deployed_stitches[-1] == palette.num_stitches - 1
    moved = [
        float(p.abs().sum()) > 0 for p in (next(iter(palette.stitch_bias_parameters(k).values())) for k in range(4))
    ]
    assert moved == [k in trainer.stitch_history for k in range(4)]
    with pytest.raises(ValueError, match="distill_alpha"):
        sft_args(tmp_path, StitchSFTConfig, distill_alpha=0.5)

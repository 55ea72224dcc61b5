"""PST: frozen anchors, shared LoRA, stitch biases; merge and adapter round trips."""

import pytest
import torch
from conftest import VOCAB, build_palette

from stitched_llama import StitchedLlamaForCausalLM
from stitched_llama.esta import (
    EstaConfig,
    load_esta_adapter,
    merge_esta,
    prepare_esta,
    save_esta_adapter,
    trainable_parameters,
    unwrap_palette,
)

X = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def perturb_trainable(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_prepare_freezes_anchors_and_starts_as_the_palette():
    palette, _ = build_palette("qwen2")
    before = [palette(X, stitch=k).logits for k in range(palette.num_stitches)]
    model = prepare_esta(palette)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".stitch_bias." in n for n in trainable)
    assert any("stitch_layers" in n and "lora_" in n for n in trainable)
    with torch.no_grad():
        for k in range(palette.num_stitches):
            assert torch.equal(model(input_ids=X, stitch=k).logits, before[k])


def test_stitch_bias_acts_only_on_its_own_stitch():
    palette, _ = build_palette("llama")
    model = prepare_esta(palette)
    before = [model(input_ids=X, stitch=k).logits.detach() for k in range(palette.num_stitches)]
    with torch.no_grad():
        for p in palette.stitch_bias_parameters(2).values():
            p.fill_(0.3)
    for k in range(palette.num_stitches):
        same = torch.equal(model(input_ids=X, stitch=k).logits, before[k])
        assert same == (k != 2), k


def test_stitch_biases_are_layers_on_the_linears_they_bias():
    palette, _ = build_palette("llama")
    linears = [n for n, m in palette.named_modules() if isinstance(m, torch.nn.Linear)]
    prepare_esta(palette)
    for k in range(palette.num_stitches):
        prefixes = tuple(p + "." for p in palette.stitch_module_prefixes(k))
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", *palette.stitch_layers)
        expected = {n for n in linears if (n + ".").startswith(prefixes) and n.rsplit(".", 1)[-1] in targets}
        assert expected and set(palette.stitch_bias_parameters(k)) == expected, k
    # each linear holds one bias per stitch that runs it, under the linear's own name
    layer0 = palette.stitch_bias_parameters(0)["small.model.layers.0.self_attn.q_proj"]
    assert layer0.shape == (palette.small.config.hidden_size,)
    names = list(palette.state_dict())
    runs_small_layer0 = [k for k in range(palette.num_stitches) if palette.config.stitch_parts(k)[0] >= 1]
    assert [n for n in names if n.startswith("small.model.layers.0.self_attn.q_proj.base_layer.stitch_bias.")] == [
        f"small.model.layers.0.self_attn.q_proj.base_layer.stitch_bias.{k}" for k in runs_small_layer0
    ]
    assert not any("-" in n or n.startswith("stitch_biases.") for n in names)


@torch.no_grad()
def test_a_copied_palette_runs_its_own_stitch_biases():
    import copy

    palette, _ = build_palette("llama")
    palette.add_stitch_biases(["q_proj"])
    twin = copy.deepcopy(palette)
    before = palette(X, stitch=1).logits
    for p in twin.stitch_bias_parameters(1).values():
        p.fill_(0.5)
    assert not torch.equal(twin(X, stitch=1).logits, before)
    assert torch.equal(palette(X, stitch=1).logits, before)


def test_trainable_parameter_report():
    palette, _ = build_palette("llama")
    report = trainable_parameters(prepare_esta(palette, EstaConfig(r=2)))
    assert 0 < report["trainable"] < report["total"]
    assert len(report["per_stitch"]) == palette.num_stitches
    assert all(0 < n <= report["trainable"] for n in report["per_stitch"])
    # the large anchor runs more adapted layers than the small one
    assert report["per_stitch"][-1] > report["per_stitch"][0]


def test_methods():
    palette, _ = build_palette("llama")
    full = prepare_esta(palette, EstaConfig(method="snnet-full"))
    assert full is palette
    assert all(p.requires_grad for p in palette.small.parameters())
    assert all(p.requires_grad for p in palette.stitch_layers.parameters())
    palette, _ = build_palette("llama")
    no_bias = prepare_esta(palette, EstaConfig(method="lora-no-bias"))
    assert not any(palette.stitch_bias_parameters(k) for k in range(palette.num_stitches))
    assert all("lora_" in n for n, p in no_bias.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="Unknown method"):
        EstaConfig(method="full")
    with pytest.raises(ValueError, match="gate_proj"):
        EstaConfig(target_modules=("qproj",))


@torch.no_grad()
def test_merge_gives_the_same_logits_and_saves_as_a_palette(tmp_path):
    palette, _ = build_palette("qwen2")
    model = prepare_esta(palette, EstaConfig(target_modules=("q_proj", "v_proj", "up_proj")))
    perturb_trainable(model)
    expected = [model(input_ids=X, stitch=k).logits for k in range(palette.num_stitches)]
    merged = merge_esta(model)
    assert isinstance(merged, StitchedLlamaForCausalLM)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    for k in range(merged.num_stitches):
        assert torch.allclose(merged(X, stitch=k).logits, expected[k], atol=1e-5)
    merged.save_pretrained(tmp_path)
    loaded = StitchedLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.stitch_bias_targets == ["q_proj", "v_proj", "up_proj", "stitch_layers"]
    for k in range(merged.num_stitches):
        assert torch.allclose(loaded(X, stitch=k).logits, expected[k], atol=1e-5)


@torch.no_grad()
def test_adapter_only_save_and_load(tmp_path):
    palette, (small, large) = build_palette("llama")
    model = prepare_esta(palette)
    perturb_trainable(model, seed=1)
    expected = [model(input_ids=X, stitch=k).logits for k in range(palette.num_stitches)]
    save_esta_adapter(model, tmp_path)
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert "adapter_model.safetensors" in sizes and "stitch_weights.safetensors" in sizes
    assert not any(name.startswith("model") for name in sizes)  # no anchor weights
    reloaded = load_esta_adapter(tmp_path, small=small, large=large)
    for k in range(palette.num_stitches):
        assert torch.allclose(reloaded(input_ids=X, stitch=k).logits, expected[k], atol=1e-6)


def own_stitch_weights(palette):
    """`{name: parameter}` of the stitching layers' own weights and biases (not LoRA, not stitch biases)."""
    return {n: p for n, p in palette.stitch_layers.named_parameters() if n.endswith((".weight", ".bias"))}


def test_train_stitch_layers_trains_their_own_weights_instead_of_a_lora(tmp_path):
    import copy

    palette, anchors = build_palette("llama")
    anchors = copy.deepcopy(anchors)  # the palette adopts its anchors, and peft then wraps their linears
    model = prepare_esta(palette, EstaConfig(train_stitch_layers=True))
    own = own_stitch_weights(palette)
    assert set(own) == {f"{key}.{kind}" for key in palette.stitch_layers for kind in ("weight", "bias")}
    assert all(p.requires_grad for p in own.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("stitch_layers" in n and "lora_" in n for n in trainable)
    assert any("stitch_layers" in n and ".stitch_bias." in n for n in trainable)
    anchor_weights = [
        n for n in trainable if ".stitch_bias." not in n and "lora_" not in n and "stitch_layers" not in n
    ]
    assert anchor_weights == []

    # a trainable reload trains them again; a plain one keeps them frozen, with the saved values either way
    perturb_trainable(model, seed=2)
    expected = [model(input_ids=X, stitch=k).logits.detach() for k in range(palette.num_stitches)]
    save_esta_adapter(model, tmp_path)
    for is_trainable in (True, False):
        small, large = copy.deepcopy(anchors)
        reloaded = load_esta_adapter(tmp_path, small=small, large=large, is_trainable=is_trainable)
        again = own_stitch_weights(unwrap_palette(reloaded))
        assert all(p.requires_grad == is_trainable for p in again.values())
        for name, p in again.items():
            assert torch.equal(p, own[name]), name
        with torch.no_grad():
            for k in range(palette.num_stitches):
                assert torch.allclose(reloaded(input_ids=X, stitch=k).logits, expected[k], atol=1e-6)


def test_default_keeps_the_stitching_layers_own_weights_frozen(tmp_path):
    import copy

    palette, anchors = build_palette("llama")
    anchors = copy.deepcopy(anchors)
    model = prepare_esta(palette)

    def frozen_weights(palette):
        names = ("base_layer.weight", "base_layer.bias")
        return {n: p for n, p in palette.stitch_layers.named_parameters() if n.endswith(names)}

    assert frozen_weights(palette) and not any(p.requires_grad for p in frozen_weights(palette).values())
    # a trainable reload trains their LoRA again, not the weights under it
    save_esta_adapter(model, tmp_path)
    reloaded = unwrap_palette(load_esta_adapter(tmp_path, *anchors, is_trainable=True))
    again = frozen_weights(reloaded)
    assert again and not any(p.requires_grad for p in again.values())
    assert any(p.requires_grad for n, p in reloaded.stitch_layers.named_parameters() if "lora_" in n)

"""A palette of stitched models between two LLaMA-family anchors, as one Transformers causal LM.

    tokens -> S.embed -> S.layer[0..n-1] -> P_n -> L.layer[j..L_L-1] -> L.norm -> L.lm_head -> logits

The anchors are held whole (`self.small`, `self.large`, each a `*ForCausalLM`), so the anchor stitches run
exactly the plain anchors' modules. Stitching layers `P_n` live in `self.stitch_layers`. This file and the
configuration file are all that travels with a saved palette (`trust_remote_code=True`): they import only torch,
transformers and safetensors. Building, exporting and profiling live in the package, which the methods that do
them import when called (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging

from .configuration_stitched_llama import StitchedLlamaConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument of layers, masks and outputs from `past_key_values` to `cache`.
# The palette accepts both names and hands the anchors' modules the one the installed version reads.
CACHE_KEY = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

# Measurements of a palette (eval metrics, learned importance, latency profile) are not part of the model: they live
# in `palette.stitch_report`, saved next to the weights. Palettes saved before kept them in the config.
REPORT_FILE = "stitch_report.json"
REPORT_SECTIONS = ("metrics", "importance", "profile")
_LEGACY_REPORT_KEYS = {"stitch_metrics": "metrics", "stitch_importance": "importance", "stitch_profile": "profile"}


def _layer_type(config, i: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


class FirstTokenState(nn.Module):
    """The large anchor's mean state entering layer `j` at the first token, which a hybrid stitch feeds it there
    instead of the stitching layer's output (`config.map_first_token`). A buffer: fitted, never trained."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.register_buffer("state", torch.zeros(hidden_size))

    def forward(self, hidden_states: torch.Tensor, is_first: torch.BoolTensor) -> torch.Tensor:
        return torch.where(is_first.unsqueeze(-1), self.state.to(hidden_states.dtype), hidden_states)


def _first_token_mask(
    attention_mask: torch.Tensor | None, past_seen: int | torch.Tensor, hidden: torch.Tensor
) -> torch.BoolTensor:
    """`[batch, seq]`: True where the token is its row's first real one (left padding and caches included)."""
    # An offset rather than arange's bounds: a static cache's length is a tensor, which compiled graphs take as data.
    index = torch.arange(hidden.shape[1], device=hidden.device) + past_seen
    if attention_mask is not None and attention_mask.dim() == 2:
        first = attention_mask.to(hidden.device).long().argmax(dim=-1)  # the first attended position of each row
    else:
        first = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return index.unsqueeze(0) == first.unsqueeze(1)


_BIAS_NAME = re.compile(r"(?:^|\.)stitch_bias\.(\d+)$")


def stitch_of_bias(name: str) -> int | None:
    """The stitch a parameter named `name` is the bias of (`...q_proj.stitch_bias.3` -> 3), None for any other."""
    match = _BIAS_NAME.search(name)
    return int(match.group(1)) if match else None


class StitchBias(nn.Module):
    """The stitch-specific biases of one linear, one per stitch that runs it: the running stitch's is added to the
    linear's output. It hangs on the linear as its child `stitch_bias` (parameters `q_proj.stitch_bias.<stitch>`),
    the way peft's layers carry their adapters, and is called by a forward hook, so the linear keeps its own
    weights and names, and a LoRA wrapped around it later wraps the biased linear."""

    def __init__(self, out_features: int, stitches: Iterable[int], running: dict[str, Any]) -> None:
        super().__init__()
        for k in stitches:
            self.register_parameter(str(k), nn.Parameter(torch.zeros(out_features)))
        # {"stitch": the stitch forward runs, "enabled": bool}: one dict shared by the palette and its stitch views.
        self.running = running

    def forward(self, output: torch.Tensor) -> torch.Tensor:  # output: [..., out_features]
        bias = getattr(self, str(self.running["stitch"]), None) if self.running["enabled"] else None
        return output if bias is None else output + bias.to(output.dtype)

    @staticmethod
    def hook(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return linear.stitch_bias(output)


@dataclass
class StitchedCausalLMOutput(CausalLMOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        The final normed hidden state the head reads. Trainers with a fused head and loss (TRL's `SFTTrainer`) call a
        causal LM's `base_model` for it; a palette is its own base model, so its output carries it too.
    """

    last_hidden_state: torch.FloatTensor | None = None


class StitchedLlamaPreTrainedModel(PreTrainedModel):
    config: StitchedLlamaConfig
    config_class = StitchedLlamaConfig
    base_model_prefix = "palette"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Anchors init themselves (they are PreTrainedModels); a stitching layer without calibration starts
        # as a zero-padded identity, the least-squares fit in `from_anchors` replaces it.
        if isinstance(module, nn.Linear) and module in set(self.stitch_layers.values()):
            with torch.no_grad():
                module.weight.zero_()
                k = min(module.in_features, module.out_features)
                module.weight[:k, :k] = torch.eye(k, dtype=module.weight.dtype)
                module.bias.zero_()
        elif isinstance(module, FirstTokenState):
            module.state.zero_()
        elif isinstance(module, StitchBias):
            with torch.no_grad():
                for param in module.parameters(recurse=False):
                    param.zero_()


class StitchedLlamaForCausalLM(StitchedLlamaPreTrainedModel, GenerationMixin):
    def __init__(
        self,
        config: StitchedLlamaConfig,
        small: PreTrainedModel | None = None,
        large: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        # A slim (exported) palette holds one stitch: an exported anchor needs only that anchor.
        only = tuple(config.stitches[0]) if config.slim else None
        needs_small, needs_large = only != config.large_stitch, only != config.small_stitch
        # Passing built anchors adopts them as they are (no copy); otherwise they are built from the configs.
        if small is None and needs_small:
            small = AutoModelForCausalLM.from_config(config.small_config)
        if large is None and needs_large:
            large = AutoModelForCausalLM.from_config(config.large_config)
        self.small, self.large = small, large
        # One config object per anchor, so attention-implementation switches reach the modules that read it.
        if small is not None:
            config.small_config = small.config
        if large is not None:
            config.large_config = large.config
        config._attn_implementation = config._attn_implementation  # the setter passes it on to both anchors
        d_small, d_large = config.small_config.hidden_size, config.large_config.hidden_size
        keys = {config.stitch_layer_key(k) for k in range(len(config.stitches))} - {None}
        self.stitch_layers = nn.ModuleDict({key: nn.Linear(d_small, d_large) for key in sorted(keys)})
        self.first_token_states = nn.ModuleDict()
        if config.map_first_token:
            for k in range(len(config.stitches)):
                if config.stitch_layer_key(k) is not None:
                    self.first_token_states[self._first_token_key(k)] = FirstTokenState(d_large)
        # {"metrics": {stitch: {name: value}}, "importance": [per stitch], "profile": {...}}, see `update_stitch_report`.
        self.stitch_report: dict[str, Any] = {}
        # Shared with `stitch_view`s: the stitch biases read the stitch of whichever forward is running.
        self._bias_state = {"stitch": config.default_stitch, "enabled": True}
        if config.stitch_bias_targets:
            self._build_stitch_biases(config.stitch_bias_targets)
        if config.slim and needs_small and needs_large:
            # An exported hybrid runs the small embedding and the large norm and head only.
            self.small.lm_head, self.small.model.norm, self.large.model.embed_tokens = None, None, None
        self.post_init()
        # The anchors share a tokenizer, so the palette starts, pads and stops generating as they do.
        anchor_generation = (small if small is not None else large).generation_config
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, key, None) is None:
                setattr(self.generation_config, key, getattr(anchor_generation, key, None))

    # ----- choosing a stitch -----

    @property
    def active_stitch(self) -> int:
        """The stitch `forward` and `generate` run when none is given (`config.default_stitch`)."""
        return self.config.default_stitch

    def set_stitch(self, stitch: int) -> StitchedLlamaForCausalLM:
        """Switch the active stitch (kept by `save_pretrained` as `config.default_stitch`)."""
        self.config.default_stitch = self.config.resolve_stitch(stitch)
        return self

    @property
    def num_stitches(self) -> int:
        return len(self.config.stitches)

    def stitch_table(self) -> list[dict]:
        """One row per stitch: index, `(n, j)`, skipped large layers, kind, layers run, parameters used and
        forward FLOPs per token."""
        rows = []
        for k in range(self.num_stitches):
            cost = self.config.stitch_cost(k)
            n, j, skipped = self.config.stitch_parts(k)
            rows.append(
                {
                    "stitch": k,
                    "n": n,
                    "j": j,
                    "skip": [skipped.start, skipped.stop] if skipped else None,
                    "name": self.config.stitch_name(k),
                    "kind": self.config.stitch_kind(k),
                    "layers": self.config.num_layers(k),
                    "params": cost.params,
                    "flops_per_token": cost.flops_per_token,
                }
            )
        return rows

    def format_stitch_table(self) -> str:
        """The stitch table as markdown, for printing and model cards."""
        lines = ["| stitch | (n, j) | kind | layers | params | FLOPs/token |", "|---|---|---|---|---|---|"]
        for r in self.stitch_table():
            lines.append(
                f"| {r['stitch']} | {r['name']} | {r['kind']} | {r['layers']} | "
                f"{_human(r['params'])} | {_human(r['flops_per_token'])} |"
            )
        return "\n".join(lines)

    def _segments(self, stitch: int) -> tuple[PreTrainedModel, list[tuple[PreTrainedModel, range]], PreTrainedModel]:
        """(entry anchor, [(anchor, indices of its layers to run)], exit anchor) of a stitch."""
        n, j, skipped = self.config.stitch_parts(stitch)
        n_small, n_large = self.config.small_stitch
        if (n, j) == self.config.small_stitch:
            return self.small, [(self.small, range(n_small))], self.small
        large_layers = [i for i in range(j, n_large) if i not in skipped]
        if (n, j) == self.config.large_stitch:
            return self.large, [(self.large, large_layers)], self.large
        return self.small, [(self.small, range(n)), (self.large, large_layers)], self.large

    def stitch_view(self, stitch: int) -> StitchedLlamaForCausalLM:
        """A model that shares every parameter with this palette but runs its own stitch.

        For self-speculative decoding: `palette.generate(..., assistant_model=palette.stitch_view(0))` drafts
        with the small anchor and verifies with the active stitch, with no second copy of the weights.
        """
        view = copy.copy(self)  # a new module object over the same submodules and parameters
        view.__dict__["config"] = copy.copy(self.config)
        view.__dict__["generation_config"] = copy.deepcopy(self.generation_config)
        view.set_stitch(stitch)
        return view

    def profile_stitches(self, stitches: Sequence[int] | None = None, **kwargs) -> dict:
        """Measure prefill and per-token decode time and peak memory of each stitch on the current device.

        Stored in `stitch_report["profile"]` (saved with the palette); see `budget.profile_stitches`.
        """
        budget = _package("budget", "Profiling stitches")
        return budget.profile_stitches(self, list(stitches) if stitches is not None else None, **kwargs)

    def select_stitch(
        self,
        max_params: float | str | None = None,
        max_flops: float | str | None = None,
        max_latency_ms: float | str | None = None,
        max_memory_mb: float | str | None = None,
    ) -> int:
        """The best stitch that fits every budget (numbers, or strings with units: "1.5B", "20ms", "2GB")."""
        budget = _package("budget", "Choosing a stitch by budget")
        return budget.select_stitch(self, max_params, max_flops, max_latency_ms, max_memory_mb)

    def update_stitch_report(
        self,
        metrics: dict[str, dict[str, float]] | None = None,
        importance: Sequence[float] | None = None,
        profile: dict | None = None,
    ) -> dict[str, Any]:
        """Replace sections of `stitch_report`, the palette's measurements (saved as `stitch_report.json` next to
        the weights and read by the model card and `select_stitch`). `metrics` maps a stitch index (as a string)
        to its eval metrics, `importance` holds one score per stitch, `profile` is `profile_stitches`' result."""
        if metrics is not None:
            unknown = sorted(set(metrics) - {str(k) for k in range(self.num_stitches)})
            if unknown:
                raise ValueError(
                    f"Metrics for stitches {unknown}, but this palette has stitches 0..{self.num_stitches - 1}: key "
                    "the metrics by stitch index, as a string."
                )
            self.stitch_report["metrics"] = {k: dict(v) for k, v in metrics.items()}
        if importance is not None:
            if len(importance) != self.num_stitches:
                raise ValueError(
                    f"{len(importance)} importance scores for a palette of {self.num_stitches} stitches: pass one "
                    "score per stitch."
                )
            self.stitch_report["importance"] = [float(x) for x in importance]
        if profile is not None:
            self.stitch_report["profile"] = profile
        return self.stitch_report

    def export_stitch(self, stitch: int, save_directory: str | os.PathLike, **kwargs) -> str:
        """Save stitch `stitch` alone: only the weights it runs, LoRA merged, its biases folded in.

        An anchor stitch is saved as a plain Llama/Mistral/Qwen2 checkpoint when its biases fit that
        architecture, anything else as a slim palette. Returns the class name of the exported model.
        """
        return _package("export", "Exporting a stitch").export_stitch(self, stitch, save_directory, **kwargs)

    # ----- stitch-specific biases -----

    def stitch_module_prefixes(self, stitch: int) -> list[str]:
        """Qualified names of the modules stitch `stitch` runs (its parameters live under these prefixes)."""
        entry, segments, exit_ = self._segments(stitch)
        names = {id(self.small): "small", id(self.large): "large"}
        prefixes = [f"{names[id(entry)]}.model.embed_tokens"]
        for anchor, layer_ids in segments:
            prefixes += [f"{names[id(anchor)]}.model.layers.{i}" for i in layer_ids]
        key = self.config.stitch_layer_key(stitch)
        if key is not None:
            prefixes.append(f"stitch_layers.{key}")
        if self._first_token_key(stitch) in self.first_token_states:
            prefixes.append(f"first_token_states.{self._first_token_key(stitch)}")
        prefixes += [f"{names[id(exit_)]}.model.norm", f"{names[id(exit_)]}.lm_head"]
        return prefixes

    def runs_parameter(self, name: str, stitch: int, prefixes: tuple[str, ...] | None = None) -> bool:
        """Whether stitch `stitch` runs the parameter `name` (a palette name; peft's `.base_layer` may be in it):
        it lies under one of the stitch's modules and is not another stitch's bias. Pass `prefixes` (the
        stitch's module prefixes, each ending in ".") when asking for many names."""
        prefixes = prefixes or tuple(p + "." for p in self.stitch_module_prefixes(stitch))
        owner = stitch_of_bias(name)
        return name.replace(".base_layer", "").startswith(prefixes) and owner in (None, stitch)

    def _first_token_key(self, stitch: int) -> str:
        n, j, _ = self.config.stitch_parts(stitch)  # the state entering large layer j: skipping later ones keeps it
        return f"{n}_{j}"

    def add_stitch_biases(self, targets: Sequence[str]) -> None:
        """Give every stitch a zero bias on each `targets` linear it runs (e.g. `["q_proj", "stitch_layers"]`)."""
        if self.config.stitch_bias_targets:
            raise ValueError(
                f"This palette already has stitch biases on {self.config.stitch_bias_targets}: build it again "
                "from its anchors to choose other targets."
            )
        self.config.stitch_bias_targets = list(targets)
        self._build_stitch_biases(targets)

    def _build_stitch_biases(self, targets: Sequence[str]) -> None:
        """A zero `StitchBias` on every `targets` linear a stitch runs that has none yet: all of them in `__init__`,
        and after a quantized load the linears bitsandbytes replaced (their children went with them)."""
        runs: dict[str, list[int]] = {}  # target linear -> the stitches that run it
        for k in range(self.num_stitches):
            for prefix in self.stitch_module_prefixes(k):
                for name, module in self.get_submodule(prefix).named_modules(prefix=prefix):
                    is_target = name.split(".")[-1] in targets or (
                        prefix.startswith("stitch_layers.") and "stitch_layers" in targets and name == prefix
                    )
                    if is_target and isinstance(module, nn.Linear):
                        runs.setdefault(name, []).append(k)
        for name, stitches in runs.items():
            linear = self.get_submodule(name)
            if isinstance(getattr(linear, "stitch_bias", None), StitchBias):
                continue
            linear.stitch_bias = StitchBias(linear.out_features, stitches, self._bias_state)
            if linear.weight.device.type != "meta":  # under `from_pretrained`'s meta init, loading places it
                linear.stitch_bias.to(linear.weight.device)
            linear.register_forward_hook(StitchBias.hook)

    def named_stitch_bias_modules(self) -> Iterator[tuple[str, StitchBias]]:
        """(qualified name, module) of every `StitchBias`, under the palette's names."""
        for name, module in self.named_modules():
            if isinstance(module, StitchBias):
                yield name.replace(".base_layer", ""), module

    def stitch_bias_parameters(self, stitch: int) -> dict[str, nn.Parameter]:
        """{name of the biased linear: its bias} for stitch `stitch` (empty without stitch biases)."""
        return {
            name.removesuffix(".stitch_bias"): param
            for name, module in self.named_stitch_bias_modules()
            if (param := getattr(module, str(stitch), None)) is not None
        }

    @contextlib.contextmanager
    def disable_stitch_biases(self) -> Iterator[None]:
        """Run without the stitch biases, as peft's `disable_adapter()` runs without LoRA: together they give
        the frozen anchors back (the teacher of distillation)."""
        enabled, self._bias_state["enabled"] = self._bias_state["enabled"], False
        try:
            yield
        finally:
            self._bias_state["enabled"] = enabled

    # ----- running it -----

    def get_input_embeddings(self) -> nn.Module:
        return self._segments(self.active_stitch)[0].get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self._segments(self.active_stitch)[2].get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        stitch: int | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StitchedCausalLMOutput | tuple:
        r"""
        cache (`Cache`, *optional*):
            The KV cache to continue (named `past_key_values` before transformers 5.24; either name works).
        stitch (`int`, *optional*):
            Index of the stitch to run for this call; defaults to the active stitch (`set_stitch`).
        output_attentions (`bool`, *optional*):
            Return `attentions`: one `[batch, heads, seq, keys]` tensor per layer the stitch runs, with that layer's
            anchor's head count. Needs the eager attention (`attn_implementation="eager"`).
        output_hidden_states (`bool`, *optional*):
            Return `hidden_states`: the embeddings, then the input of every later layer the stitch runs, then the
            final normed state, as a plain model does. A hybrid's entries are `small` wide up to its `n`-th entry
            (the embeddings and the first `n - 1` small layers' outputs) and `large` wide after the stitching layer.
        """
        if cache is not None and past_key_values is not None:
            raise ValueError("Pass the KV cache once, as `cache` or as `past_key_values`, not both.")
        cache = cache if cache is not None else past_key_values
        # Trainer passes the token count for loss normalisation; it is for the loss, not for the layers.
        loss_kwargs = {"num_items_in_batch": kwargs.pop("num_items_in_batch")} if "num_items_in_batch" in kwargs else {}
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        stitch = self.active_stitch if stitch is None else self.config.resolve_stitch(stitch)
        # Read by the stitch-bias hooks, also when gradient checkpointing re-runs layers during backward.
        self._bias_state["stitch"] = stitch
        entry, segments, exit_ = self._segments(stitch)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            vocab = entry.model.embed_tokens.num_embeddings
            # An id out of range is an opaque IndexError on CPU and a device-side assert on CUDA; the check syncs,
            # so it stays out of compiled graphs.
            outside = None if torch.compiler.is_compiling() else (input_ids < 0) | (input_ids >= vocab)
            if outside is not None and outside.any():
                bad = input_ids[outside]
                raise ValueError(
                    f"input_ids holds the token id {int(bad[0])}, outside this palette's vocabulary 0..{vocab - 1}: "
                    "encode text with the anchors' tokenizer, and pad with its pad_token_id (not -100, which only "
                    "`labels` may hold)."
                )
            inputs_embeds = entry.model.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            # Each stitch fills the slots with its own layers' keys: another stitch cannot continue them.
            owner = getattr(cache, "_stitch", None)
            # `past_seen` last: on a static cache it is a tensor, which a compiled graph cannot branch on.
            if owner is not None and owner != stitch and past_seen > 0:
                raise ValueError(
                    f"This cache holds {past_seen} tokens from stitch {owner}, so stitch {stitch} cannot continue "
                    f"it: pass `stitch={owner}`, or start stitch {stitch} with a new cache (`cache=None`)."
                )
            cache._stitch = stitch
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        # Masks read the cache's current length, so build them for both anchors before any layer writes to it.
        masks = []
        for anchor, _ in segments:
            mask_kwargs = {
                "config": anchor.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_KEY: cache,
                "position_ids": position_ids,
            }
            anchor_masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if getattr(anchor.config, "sliding_window", None) is not None:
                anchor_masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
            masks.append(anchor_masks)

        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        all_hidden_states = [] if output_hidden_states else None  # each [batch, seq, width of its layer]
        output_attentions = kwargs.pop("output_attentions", None)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        all_attentions: list[torch.Tensor | None] = []  # each [batch, heads of its layer, seq, keys]
        hooks = []
        if output_attentions:
            # Decoder layers return the hidden state alone: take each attention's weights as it returns them.
            for anchor, layer_ids in segments:
                for i in layer_ids:
                    attention = anchor.model.layers[i].self_attn
                    hooks.append(attention.register_forward_hook(lambda m, a, out: all_attentions.append(out[1])))
        hidden_states = inputs_embeds
        slot = 0  # the active stitch's layers fill cache slots 0, 1, ... in the order they run
        try:
            for (anchor, layer_ids), anchor_masks in zip(segments, masks):
                if anchor is self.large and len(segments) == 2:
                    hidden_states = self.stitch_layers[self.config.stitch_layer_key(stitch)](hidden_states)
                    if self.config.map_first_token:
                        is_first = _first_token_mask(attention_mask, past_seen, hidden_states)
                        hidden_states = self.first_token_states[self._first_token_key(stitch)](hidden_states, is_first)
                position_embeddings = anchor.model.rotary_emb(hidden_states, position_ids=position_ids)
                layer_types = [_layer_type(anchor.config, i) for i in layer_ids]
                for i, layer_type in zip(layer_ids, layer_types):
                    if all_hidden_states is not None:
                        all_hidden_states.append(hidden_states)
                    layer = anchor.model.layers[i]
                    layer.self_attn.layer_idx = slot
                    hidden_states = layer(
                        hidden_states,
                        attention_mask=anchor_masks[layer_type],
                        position_embeddings=position_embeddings,
                        position_ids=position_ids,
                        use_cache=use_cache,
                        **{CACHE_KEY: cache},
                        **kwargs,
                    )
                    slot += 1
        finally:
            # Give the anchors their own layer indices back, so they still work on their own.
            for anchor, layer_ids in segments:
                for i in layer_ids:
                    anchor.model.layers[i].self_attn.layer_idx = i
            for hook in hooks:
                hook.remove()
        if output_attentions and any(a is None for a in all_attentions):
            raise ValueError(
                f"output_attentions=True needs attention weights, which the {self.config._attn_implementation!r} "
                "attention does not compute: load the palette with attn_implementation='eager' (or call "
                "`palette.set_attn_implementation('eager')`)."
            )

        hidden_states = exit_.model.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = exit_.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = StitchedCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            last_hidden_state=hidden_states,
            **{CACHE_KEY: cache},
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    # ----- building and saving -----

    @classmethod
    def from_anchors(
        cls,
        small: PreTrainedModel | str | os.PathLike,
        large: PreTrainedModel | str | os.PathLike,
        stitches: Sequence[tuple[int, int]] | None = None,
        calibration: Any = None,
        tokenizer: Any = None,
        *,
        share_stitch_layers: bool = True,
        map_first_token: bool = True,
        ridge: float = 1e-2,
        max_length: int = 512,
        batch_size: int = 8,
        **kwargs,
    ) -> StitchedLlamaForCausalLM:
        """Build a palette from two anchors and fit its stitching layers by least squares.

        Args:
            small, large: the anchors, as models (adopted, not copied) or local paths / Hub ids.
            stitches: `(n, j)` pairs, or `(n, j, a, b)` to also skip the large anchor's layers `a .. b-1`; defaults
                to SN-Net's rule plus both anchors (docs/concepts.md). `layer_skip_stitches` proposes blocks.
            calibration: text for the fit: a list of strings (with `tokenizer`), a tokenized
                `datasets.Dataset` or a LongTensor of token ids. None falls back to random tokens, with a warning.
            tokenizer: the anchors' shared tokenizer; loaded from `small` when that is a path and None is given.
                It is saved alongside the palette.
            share_stitch_layers: one stitching layer per small-anchor cut `n` (True) or one per stitch.
            map_first_token: feed the large anchor its own mean first-token state in hybrid stitches (see
                `StitchedLlamaConfig.map_first_token`); fitted on the calibration sequences' first tokens.
            ridge: ridge term of the fit, relative to the mean eigenvalue of the normal equations.
            max_length, batch_size: how calibration text is cut and batched.
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` for anchors given as paths
                (e.g. `dtype`, `quantization_config`, `attn_implementation`).
        """
        if tokenizer is None and not isinstance(small, PreTrainedModel):
            tokenizer = _load_tokenizer(small)
        small = small if isinstance(small, PreTrainedModel) else AutoModelForCausalLM.from_pretrained(small, **kwargs)
        large = large if isinstance(large, PreTrainedModel) else AutoModelForCausalLM.from_pretrained(large, **kwargs)
        dtypes = {
            name: anchor.get_input_embeddings().weight.dtype for name, anchor in (("small", small), ("large", large))
        }
        if dtypes["small"] != dtypes["large"]:
            raise ValueError(
                f"The anchors have different dtypes (small {dtypes['small']}, large {dtypes['large']}), and a stitch "
                "runs both: load them in one dtype (`dtype=torch.bfloat16` for both, or `.to(dtype)` one of them)."
            )
        _check_tokenizers(tokenizer, small, large)
        if tokenizer is not None and len(tokenizer) > small.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the anchors' vocab_size is "
                f"{small.config.vocab_size}: pass the tokenizer the anchors were trained with."
            )
        # Keep the anchors' attention implementation when they agree, else the palette picks one for both.
        attn = {small.config._attn_implementation, large.config._attn_implementation}
        config = StitchedLlamaConfig(
            small_config=small.config,
            large_config=large.config,
            stitches=[list(s) for s in stitches] if stitches is not None else None,
            share_stitch_layers=share_stitch_layers,
            map_first_token=map_first_token,
            attn_implementation=attn.pop() if len(attn) == 1 else None,
        )
        model = cls(config, small=small, large=large)
        reference = large.get_input_embeddings().weight
        model.stitch_layers.to(device=reference.device, dtype=reference.dtype)
        model.first_token_states.to(device=reference.device, dtype=reference.dtype)
        model.eval()

        targets: dict[str, list[tuple[int, int]]] = {}
        entries: dict[str, int] = {}  # first-token state -> the large-anchor layer it enters
        for k in range(len(config.stitches)):
            key = config.stitch_layer_key(k)
            n, j, _ = config.stitch_parts(k)
            if key is not None and (n, j) not in targets.get(key, []):  # a skip after j leaves the fit as it is
                targets.setdefault(key, []).append((n, j))
                entries[model._first_token_key(k)] = j
        if targets:
            stitch_init = _package("stitch_init", "Building a palette")
            batches = stitch_init.calibration_batches(
                calibration,
                tokenizer,
                vocab_size=config.vocab_size,
                min_tokens=config.small_config.hidden_size + 1,
                max_length=max_length,
                batch_size=batch_size,
            )
            errors = stitch_init.fit_stitch_layers(small, large, model.stitch_layers, targets, batches, ridge=ridge)
            model.stitch_fit_errors = errors
            if map_first_token:
                states = stitch_init.fit_first_token_states(large, sorted(set(entries.values())), batches)
                for key, module in model.first_token_states.items():
                    module.state.copy_(states[entries[key]].to(module.state.dtype))
            logger.info(
                "Stitching layers fitted; relative error per layer: "
                + ", ".join(f"P_{key}: {err:.3f}" for key, err in errors.items())
            )
        model.tokenizer = tokenizer
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> StitchedLlamaForCausalLM:
        # A palette with a tensor missing would run with it freshly initialised: refuse to load it instead.
        wants_info = kwargs.pop("output_loading_info", False)
        location = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs
        }
        saved, legacy = _saved_stitch_biases(location, hub_kwargs)
        # Biases transformers cannot place are read below: an older layout's (`stitch_biases.<k>.*`), and those of
        # linears that bitsandbytes replaced. The load report would only list them, so it stays quiet.
        quiet = legacy or (saved and kwargs.get("quantization_config") is not None)
        try:
            with _quiet_load_report() if quiet else contextlib.nullcontext():
                model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:  # a truncated or overwritten file: say which one
            damaged = _damaged_safetensors(location)
            raise OSError(
                f"The palette at {location} has a damaged weight file ({', '.join(damaged) or 'unknown'}: {error}). "
                "Save it again, or copy it again from where it came from."
            ) from error
        missing, unexpected = set(info.get("missing_keys") or []), set(info.get("unexpected_keys") or [])
        if model.config.stitch_bias_targets and not unexpected.isdisjoint(saved):
            model._build_stitch_biases(model.config.stitch_bias_targets)  # again on linears a quantizer replaced
        params = dict(model.named_parameters())
        unread = {name for name in saved if name in params and (name in missing or name in unexpected)}
        if unread:
            with torch.no_grad():
                for path in {saved[name][0] for name in unread}:
                    with safe_open(path, framework="pt") as f:
                        for name in unread:
                            if saved[name][0] == path:
                                params[name].copy_(f.get_tensor(saved[name][1]))
            # An old-layout bias of a linear this palette lacks stays reported, under its new name.
            unexpected = {k for k in unexpected - unread if not k.startswith("stitch_biases.")} | (
                set(saved) - params.keys()
            )
            info = {**info, "missing_keys": missing - unread, "unexpected_keys": unexpected}
        if legacy:
            logger.info(
                f"{location} keeps its stitch biases in the layout before they were layers (`stitch_biases.<k>.*`): "
                "they were read into the new one. Save the palette again to store that."
            )
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: names for key, names in problems.items() if names}
        if problems:
            listed = "; ".join(
                f"{key.replace('_', ' ')}: {', '.join(map(str, names[:8]))}" for key, names in problems.items()
            )
            raise OSError(
                f"The palette at {location} does not match "
                f"its config ({listed}). Its weights are damaged or from another palette: save it again, or "
                "rebuild it with `from_anchors`."
            )
        model.stitch_report = _read_report(model.config, location, hub_kwargs)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, all or nothing: the folder is written next to `save_directory` and
        moved into place only once complete, so a failed save (a full disk, a NaN weight) leaves the previous
        save as it was. Tensors holding NaN or inf are refused before anything is written."""
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        check_finite(self.named_parameters(), "refusing to save")
        target = os.path.abspath(save_directory)
        parent, name = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
        try:
            # The tokenizer goes first so that `push_to_hub`, which uploads the folder after this, sends it too.
            tokenizer = getattr(self, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            _write_model_card(self, staging)
            super().save_pretrained(staging, *args, **kwargs)
            write_stitch_report(self, staging)
            _replace_folder(staging, target)
        except OSError as error:
            raise OSError(
                f"Could not save the palette to {target} ({error}); the folder holds the previous save, unchanged. "
                "Free some space or choose another folder."
            ) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _upload_modified_files(self, working_dir: str | os.PathLike, repo_id: str, *args, **kwargs):
        # push_to_hub replaces README.md with a generic card after saving: put the palette's card back.
        _write_model_card(self, working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)


def write_stitch_report(palette: StitchedLlamaForCausalLM, folder: str | os.PathLike) -> None:
    """Write `palette.stitch_report` to `folder/stitch_report.json` (atomically); nothing when nothing was measured.
    `save_pretrained` calls it; call it alone to update the measurements of a saved palette without its weights."""
    if not palette.stitch_report:
        return
    path = os.path.join(folder, REPORT_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(palette.stitch_report, f, indent=2)
    os.replace(f"{path}.tmp", path)


def _read_report(config: StitchedLlamaConfig, location: Any, hub_kwargs: dict) -> dict[str, Any]:
    """The saved `stitch_report.json`, or the measurements an older palette kept in its config (moved out of it)."""
    report = {}
    for key, section in _LEGACY_REPORT_KEYS.items():
        value = config.__dict__.pop(key, None)
        if value:
            report[section] = value
    path = _saved_file(location, REPORT_FILE, hub_kwargs)  # None: a palette nobody measured yet
    if path is not None:
        with open(path) as f:
            report.update(json.load(f))
    return report


def _saved_file(location: Any, name: str, hub_kwargs: dict) -> str | None:
    """The local path of file `name` of a saved palette (a folder or a Hub id), None when it has none."""
    if location is None or not isinstance(location, (str, os.PathLike)):
        return None
    try:
        return cached_file(location, name, **hub_kwargs)
    except OSError:
        return None


def _saved_stitch_biases(location: Any, hub_kwargs: dict) -> tuple[dict[str, tuple[str, str]], bool]:
    """({today's name: (file, key)} of the stitch biases saved at `location`, whether they are in the layout before
    they were layers, `stitch_biases.<stitch>.<linear name with "-" for ".">`); empty for a palette without biases.
    Only the keys are read: `from_pretrained` reads the few tensors that transformers could not place."""
    files = []
    index = _saved_file(location, "model.safetensors.index.json", hub_kwargs)
    if index is not None:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [_saved_file(location, shard, hub_kwargs) for shard in shards]
    else:
        files = [_saved_file(location, "model.safetensors", hub_kwargs)]
    biases, legacy = {}, False
    for path in filter(None, files):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key.startswith("stitch_biases."):
                        _, stitch, linear = key.split(".", 2)
                        biases[f"{linear.replace('-', '.')}.stitch_bias.{stitch}"] = (path, key)
                        legacy = True
                    elif stitch_of_bias(key) is not None:
                        biases[key] = (path, key)
        except (SafetensorError, OSError):  # a damaged file: `from_pretrained` says which
            return {}, False
    return biases, legacy


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' warnings while loading (its load report): the caller checks the loading info itself."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _package(module: str, what: str) -> Any:
    """A module of the stitched_llama package. Imported by name when needed, so that it does not travel as remote
    code with a saved palette (which needs only this file and the configuration file to run)."""
    try:
        return importlib.import_module(f"stitched_llama.{module}")
    except ImportError as error:
        raise ImportError(f"{what} needs the stitched_llama package: `pip install stitched-llama`.") from error


def _write_model_card(palette: StitchedLlamaForCausalLM, folder: str, **kwargs: Any) -> None:
    try:
        card = _package("model_card", "Writing the model card")
    except ImportError:  # remote code without the package: save the model, without a card
        logger.info("stitched_llama is not installed: saving the palette without its model card.")
        return
    card.write_model_card(palette, folder, **kwargs)


def check_finite(
    named_tensors: Iterable[tuple[str, torch.Tensor]], action: str, what: str = "Tensor", when: str = ""
) -> None:
    """Raise `FloatingPointError` naming the first tensor that holds NaN or inf (and its stitch, for a bias).

    `what` names the tensors ("Trainable tensor"), `when` says where it was found (" at step 4 (stitch 2)").
    """
    named = [(n, t) for n, t in named_tensors if t.is_floating_point()]
    if not named or torch.stack([t.detach().isfinite().all() for _, t in named]).all():
        return
    bad = [n for n, t in named if not t.detach().isfinite().all()]
    stitch = stitch_of_bias(bad[0])
    where = f" (the bias of stitch {stitch})" if stitch is not None else ""
    raise FloatingPointError(
        f"{what} {bad[0]}{where} holds NaN or inf{when} ({len(bad)} tensors in all): {action}. Lower the learning "
        "rate or set max_grad_norm, and resume from the last good checkpoint."
    )


def _damaged_safetensors(location: Any) -> list[str]:
    """The `.safetensors` files of a local folder that safetensors cannot open."""
    if location is None or not os.path.isdir(location):
        return []
    damaged = []
    for name in sorted(os.listdir(location)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(location, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                damaged.append(os.path.join(location, name))
    return damaged


def _replace_folder(staging: str, target: str) -> None:
    """Move the complete `staging` folder to `target`; the previous `target` is removed only after that."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    if not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a folder")
    if any(entry.is_dir() for entry in os.scandir(target)):
        # More than a save lives there (a Trainer output folder with its checkpoints): move the files in one by
        # one, config.json last, rather than replace the folder.
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(target, name))
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old, target)  # put the previous save back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(int(x))


def _load_tokenizer(path: str | os.PathLike) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _check_tokenizers(given: Any, small: PreTrainedModel, large: PreTrainedModel) -> None:
    """Compare every tokenizer given or found next to the anchors; warn when there are not two to compare."""
    found = {"the tokenizer given": given} if given is not None else {}
    for role, anchor in (("small", small), ("large", large)):
        path = anchor.config.name_or_path
        tokenizer = _load_tokenizer(path) if path and os.path.isdir(path) else None
        if tokenizer is not None:
            found[f"`{role}` ({path})"] = tokenizer
    if len(found) < 2:
        logger.warning(
            "Only the vocabulary sizes of the anchors could be compared: no second tokenizer was given or found "
            "next to them. Make sure they share a tokenizer, or pass the anchors as folders that hold theirs."
        )
        return
    (first, reference), *others = found.items()
    for name, tokenizer in others:
        if tokenizer.get_vocab() != reference.get_vocab():
            raise ValueError(
                f"The tokenizers of {first} and {name} differ: the anchors must share a tokenizer. Pick two "
                "models of the same family."
            )


__all__ = ["StitchedCausalLMOutput", "StitchedLlamaForCausalLM", "StitchedLlamaPreTrainedModel"]

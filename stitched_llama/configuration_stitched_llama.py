"""Configuration of a stitched palette: two LLaMA-family anchors and the stitches between them.

A stitch is a pair `(n, j)`: the first `n` layers of the small anchor, a linear stitching layer, then layers
`j .. L_L-1` of the large anchor. `(L_S, L_L)` is the small anchor alone and `(0, 0)` the large anchor alone.
A stitch `(n, j, a, b)` also skips the large anchor's layers `a .. b-1` (`j <= a < b`): `(0, 0, a, b)` is the large
anchor with a block dropped, the layer-dropping baseline as a member of the palette (docs/concepts.md).
This file imports nothing from the rest of the package so that it can travel to the Hub as remote code.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# LLaMA-style decoders with the same module names (`model.layers[i].self_attn.q_proj`, ...).
SUPPORTED_ANCHOR_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class StitchCost:
    """Exact cost of one stitch, from the two anchor configs."""

    params: int
    """Parameters the stitch uses (embedding, layers, stitching layer, norm, head; tied matrices once)."""
    flops_per_token: int
    """Forward FLOPs per token of the matmuls: 2 x multiply-accumulates of every linear layer used, lm_head
    included. Embedding lookups, norms, activations and the attention scores themselves are not counted."""


def _anchor_costs(cfg: PreTrainedConfig) -> dict[str, int]:
    """Parameter counts of one anchor's parts. Biases follow each architecture's modeling file."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // n_heads
    q, kv = n_heads * head_dim, n_kv * head_dim
    attn_w = h * q + 2 * h * kv + q * h
    if cfg.model_type == "qwen2":  # q, k and v carry biases, o does not
        attn_b = q + 2 * kv
    elif getattr(cfg, "attention_bias", False):  # llama's option: all four projections
        attn_b = q + 2 * kv + h
    else:
        attn_b = 0
    mlp_w = 3 * h * inter
    mlp_b = 2 * inter + h if getattr(cfg, "mlp_bias", False) else 0
    return {
        "embed": cfg.vocab_size * h,
        "layer": attn_w + attn_b + mlp_w + mlp_b + 2 * h,  # + the two RMSNorm weights
        "layer_macs": attn_w + mlp_w,
        "norm": h,
        "head": cfg.vocab_size * h,
    }


class StitchedLlamaConfig(PreTrainedConfig):
    r"""
    Configuration of [`StitchedLlamaForCausalLM`].

    Args:
        small_config (`dict` or `PreTrainedConfig`):
            Config of the small anchor (`llama`, `mistral` or `qwen2`).
        large_config (`dict` or `PreTrainedConfig`):
            Config of the large anchor. Must share the small anchor's vocabulary.
        stitches (`list[tuple[int, ...]]`, *optional*):
            The `(n, j)` pairs of the palette, or `(n, j, a, b)` to also skip the large anchor's layers `a .. b-1`. Defaults to SN-Net's rule (one hybrid per large-anchor cut `j`,
            with the small-anchor cut at the same relative depth). Both anchors are always part of the palette
            (added when missing). Stored sorted by cost: index 0 is the small anchor alone, the last index the
            large anchor alone, the hybrids in between by forward FLOPs.
        share_stitch_layers (`bool`, defaults to `True`):
            Share one stitching layer between all stitches that leave the small anchor after the same `n`
            layers (as SN-Net does). With `False`, every hybrid stitch owns its stitching layer.
        default_stitch (`int`, *optional*):
            The stitch `forward` and `generate` run when none is given. Defaults to the large anchor.
        deployed_stitches (`list[int]`, *optional*):
            Indices of the stitches chosen for deployment after training.
        stitch_bias_targets (`list[str]`, *optional*):
            Names of the linear layers (e.g. `q_proj`, `stitch_layers`) that carry stitch-specific biases: each
            stitch owns a bias vector for every such layer it runs, added only while that stitch is active.
        map_first_token (`bool`, defaults to `True`):
            In a hybrid stitch, replace the first token's state after the stitching layer by the large anchor's
            mean state there (`first_token_states`, fitted by `from_anchors`). LLMs park massive activations on
            the first token; its state in the large anchor is nearly the same whatever the token, and a linear
            map fitted to the other tokens cannot carry it across.
    """

    model_type = "stitched_llama"
    sub_configs_defaults = {
        "small_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "large_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    small_config: dict | PreTrainedConfig | None = None
    large_config: dict | PreTrainedConfig | None = None
    stitches: list[list[int]] | None = None
    share_stitch_layers: bool = True
    default_stitch: int | None = None
    deployed_stitches: list[int] | None = None
    stitch_bias_targets: list[str] | None = None
    map_first_token: bool = True
    slim: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        small, large = self.small_config, self.large_config
        for name, cfg in (("small", small), ("large", large)):
            if cfg.model_type not in SUPPORTED_ANCHOR_TYPES:
                raise ValueError(
                    f"`{name}` anchor has model_type {cfg.model_type!r}, which is not supported: "
                    f"use one of {', '.join(SUPPORTED_ANCHOR_TYPES)} (LLaMA-style decoders)."
                )
        if small.vocab_size != large.vocab_size:
            raise ValueError(
                f"`small` has vocab_size {small.vocab_size} but `large` has {large.vocab_size}: "
                "the anchors must share a tokenizer."
            )
        stitches = default_stitches(small.num_hidden_layers, large.num_hidden_layers)
        if self.stitches is not None:
            stitches = [_stitch_spec(s) for s in self.stitches]
        self.stitches = [list(s) for s in self._validated_stitches(stitches)]
        if self.default_stitch is None:
            self.default_stitch = len(self.stitches) - 1
        self.default_stitch = self.resolve_stitch(self.default_stitch)
        if self.deployed_stitches is not None:
            self.deployed_stitches = [self.resolve_stitch(k) for k in self.deployed_stitches]

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> StitchedLlamaConfig:
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config has model_type {model_type!r}, not {cls.model_type!r}: it is a plain model, not a "
                "palette. Build a palette from two anchors with `StitchedLlamaForCausalLM.from_anchors(small, large)`."
            )
        return super().from_dict(config_dict, **kwargs)

    # Generation and caches read these from the text config, which for a palette is the palette itself.
    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> StitchedLlamaConfig:
        return self

    @property
    def vocab_size(self) -> int:
        return self.small_config.vocab_size

    @property
    def num_hidden_layers(self) -> int:
        """Decoder layers of the deepest stitch: the KV cache holds one slot per layer of the active stitch."""
        # Read dozens of times per cache built: cached on the values it depends on.
        specs = tuple(tuple(s) for s in self.stitches)
        return _deepest(specs, self.small_config.num_hidden_layers, self.large_config.num_hidden_layers)

    @property
    def small_stitch(self) -> tuple[int, int]:
        return (self.small_config.num_hidden_layers, self.large_config.num_hidden_layers)

    @property
    def large_stitch(self) -> tuple[int, int]:
        return (0, 0)

    def stitch_parts(self, k: int) -> tuple[int, int, range]:
        """`(n, j, skipped)` of stitch `k`: small layers kept, first large layer run, large layers skipped."""
        n, j, *skip = self.stitches[k]
        return n, j, range(*skip) if skip else range(0)

    def stitch_kind(self, k: int) -> str:
        """`small anchor`, `large anchor`, `hybrid`, `layer skip` (the large anchor, a block dropped) or
        `hybrid + skip`."""
        n, j, skipped = self.stitch_parts(k)
        if (n, j) == self.small_stitch:
            return "small anchor"
        if (n, j) == self.large_stitch:
            return "layer skip" if skipped else "large anchor"
        return "hybrid + skip" if skipped else "hybrid"

    def stitch_name(self, k: int) -> str:
        """`(n, j)`, or `(n, j) skip a-c` for a stitch that skips the large anchor's layers a .. c (`skip a` for one)."""
        n, j, skipped = self.stitch_parts(k)
        if not skipped:
            return f"({n}, {j})"
        block = f"{skipped.start}" if len(skipped) == 1 else f"{skipped.start}-{skipped.stop - 1}"
        return f"({n}, {j}) skip {block}"

    def num_layers(self, k: int) -> int:
        return _num_layers(
            tuple(self.stitches[k]), self.small_config.num_hidden_layers, self.large_config.num_hidden_layers
        )

    def resolve_stitch(self, k: int) -> int:
        """Normalise a stitch index (negative indices count from the end) or raise a clear error."""
        count = len(self.stitches)
        if isinstance(k, bool) or not isinstance(k, int) or not -count <= k < count:
            raise ValueError(
                f"Unknown stitch {k!r}: this palette has {count} stitches, pass an index in 0..{count - 1} "
                "(0 = small anchor, -1 = large anchor); `model.stitch_table()` lists them."
            )
        return k % count

    def stitch_layer_key(self, k: int) -> str | None:
        """Name of the stitching layer stitch `k` uses, or None for a stitch that runs one anchor only."""
        n, j, skipped = self.stitch_parts(k)
        if (n, j) in (self.small_stitch, self.large_stitch):
            return None
        if self.share_stitch_layers:
            return str(n)
        return f"{n}_{j}" + (f"_{skipped.start}_{skipped.stop}" if skipped else "")

    def stitch_cost(self, k: int) -> StitchCost:
        return _cost(self.small_config, self.large_config, tuple(self.stitches[k]))

    def _validated_stitches(self, stitches: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if not stitches:
            raise ValueError("`stitches` is empty: pass at least one `(n, j)` pair, or None for the default palette.")
        n_small, n_large = self.small_config.num_hidden_layers, self.large_config.num_hidden_layers
        seen = set()
        for s in stitches:
            n, j, *skip = s
            is_anchor = (n, j) in (self.small_stitch, self.large_stitch)
            if not is_anchor and not (1 <= n <= n_small and 0 <= j < n_large):
                raise ValueError(
                    f"Stitch {s} is out of range: a hybrid stitch needs 1 <= n <= {n_small} (small layers kept) "
                    f"and 0 <= j <= {n_large - 1} (first large layer run); the anchors are "
                    f"{self.small_stitch} (small) and {self.large_stitch} (large)."
                )
            if skip:
                a, b = skip
                if (n, j) == self.small_stitch or not (j <= a < b <= n_large) or b - a >= n_large - j:
                    raise ValueError(
                        f"Stitch {s} skips large-anchor layers {a}..{b - 1}, which it cannot: a skipped block "
                        f"needs j <= a < b <= {n_large}, must leave at least one of the large layers j.. it runs, "
                        "and the small anchor stitch skips nothing."
                    )
            if s in seen:
                raise ValueError(f"Stitch {s} appears twice in `stitches`: list each stitch once.")
            seen.add(s)
        # Anchors pinned to the ends, hybrids sorted by cost in between.
        hybrids = sorted(
            (s for s in stitches if s not in (self.small_stitch, self.large_stitch)),
            key=lambda s: (_cost(self.small_config, self.large_config, s).flops_per_token, s),
        )
        if self.slim:
            if len(stitches) != 1:
                raise ValueError(f"A slim (exported) palette holds exactly one stitch, got {len(stitches)}.")
            return list(stitches)
        return [self.small_stitch, *hybrids, self.large_stitch]


def _stitch_spec(s: object) -> tuple[int, ...]:
    """One `(n, j)` or `(n, j, a, b)` of whole numbers, refused rather than truncated or guessed."""
    is_spec = isinstance(s, (list, tuple)) and len(s) in (2, 4)
    if not is_spec or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in s):
        raise ValueError(
            f"Stitch {s!r} is not an `(n, j)` pair of integers: pass e.g. `stitches=[(2, 3), (1, 2)]`, with n the "
            "small-anchor layers kept and j the first large-anchor layer run (or `(n, j, a, b)` to also skip the "
            "large anchor's layers a..b-1)."
        )
    return tuple(int(x) for x in s)


def _num_layers(s: tuple[int, ...], n_small: int, n_large: int) -> int:
    n, j, *skip = s
    if (n, j) == (n_small, n_large):
        return n
    return n + n_large - j - (skip[1] - skip[0] if skip else 0)


@functools.lru_cache(maxsize=64)
def _deepest(stitches: tuple[tuple[int, ...], ...], n_small: int, n_large: int) -> int:
    return max(_num_layers(s, n_small, n_large) for s in stitches)


def default_stitches(n_small: int, n_large: int) -> list[tuple[int, int]]:
    """SN-Net's stitch space for any depths: per large-anchor cut `j`, the small cut at the same relative depth."""
    hybrids = {(max(1, round(j * n_small / n_large)), j) for j in range(1, n_large)}
    return [(n_small, n_large), *sorted(hybrids, key=lambda s: (-s[1], s[0])), (0, 0)]


def _cost(small: PreTrainedConfig, large: PreTrainedConfig, spec: tuple[int, ...]) -> StitchCost:
    n, j, *skip = spec
    dropped = skip[1] - skip[0] if skip else 0
    s, lg = _anchor_costs(small), _anchor_costs(large)
    if (n, j) == (small.num_hidden_layers, large.num_hidden_layers):
        head_params = 0 if small.tie_word_embeddings else s["head"]
        params = s["embed"] + n * s["layer"] + s["norm"] + head_params
        return StitchCost(params, 2 * (n * s["layer_macs"] + s["head"]))
    if (n, j) == (0, 0):
        k = large.num_hidden_layers - dropped
        head_params = 0 if large.tie_word_embeddings else lg["head"]
        params = lg["embed"] + k * lg["layer"] + lg["norm"] + head_params
        return StitchCost(params, 2 * (k * lg["layer_macs"] + lg["head"]))
    k = large.num_hidden_layers - j - dropped
    stitch_macs = small.hidden_size * large.hidden_size
    params = s["embed"] + n * s["layer"] + stitch_macs + large.hidden_size + k * lg["layer"] + lg["norm"] + lg["head"]
    flops = 2 * (n * s["layer_macs"] + stitch_macs + k * lg["layer_macs"] + lg["head"])
    return StitchCost(params, flops)


__all__ = ["StitchedLlamaConfig", "StitchCost", "default_stitches", "SUPPORTED_ANCHOR_TYPES"]

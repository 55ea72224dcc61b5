"""Least-squares initialisation of the stitching layers (docs/concepts.md, "Least-squares initialisation").

For a stitching layer `P_n` serving stitches `(n, j1), (n, j2), ...`, solve in float64

    min_W  sum_j || [h_S[n], 1] W - h_L[j] ||^2 + lam ||W_weight||^2

over the non-padding tokens of the calibration text, where `h_S[n]` is the small anchor's hidden state after
`n` layers and `h_L[j]` the large anchor's hidden state entering layer `j`. The first token of every sequence
is left out: its massive activations dominate a plain fit.

That first token is handled apart (`fit_first_token_states`): its state in the large anchor is nearly the same
whatever the token, so a hybrid stitch can feed the large anchor that mean state there.

Both fits read the anchors' states through `capture_anchor_states`, which diagnostics can call as well.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

Batch = tuple[torch.LongTensor, torch.LongTensor]  # (input_ids, attention_mask), right-padded
MaybeMasked = tuple[torch.LongTensor, torch.LongTensor | None]  # the mask None where nothing is padded


def calibration_batches(
    calibration: Any,
    tokenizer: Any = None,
    *,
    vocab_size: int,
    min_tokens: int,
    max_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Batch]:
    """Turn calibration data into right-padded batches of token ids.

    `calibration` is a list of strings (needs `tokenizer`), a tokenized `datasets.Dataset` (an `input_ids`
    column), a LongTensor of shape `[batch, seq]` or `[seq]`, or None. With None, sequences of random tokens
    are used and a warning says so: real text from the target domain gives better stitches.
    `min_tokens` is the least number of usable tokens (non-padding, first positions excluded) to accept.
    """
    if calibration is None:
        logger.warning(
            "No calibration data given: fitting the stitching layers on random token sequences. Pass "
            "`calibration=[...texts...]` with a `tokenizer` for stitches that start closer to the anchors."
        )
        seq_len = min(max_length, 128)
        num_seqs = max(8, math.ceil(4 * min_tokens / (seq_len - 1)))
        generator = torch.Generator().manual_seed(seed)
        sequences = list(torch.randint(vocab_size, (num_seqs, seq_len), generator=generator))
    elif isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.dim() not in (1, 2):
            raise ValueError(
                f"Calibration tensor has dtype {calibration.dtype} and shape {tuple(calibration.shape)}: "
                "pass token ids as a LongTensor of shape [batch, seq] or [seq]."
            )
        sequences = list(calibration.reshape(-1, calibration.shape[-1]).long())
    elif isinstance(calibration, (list, tuple)) and not calibration:
        raise ValueError("Calibration is an empty list: pass some text from your domain, or None for random tokens.")
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        if tokenizer is None:
            raise ValueError("Calibration is a list of strings but no `tokenizer` was given: pass `tokenizer=...`.")
        sequences = [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(list(calibration))["input_ids"]]
    elif hasattr(calibration, "column_names"):  # a datasets.Dataset, without importing datasets
        if "input_ids" not in calibration.column_names:
            raise ValueError(
                f"Calibration dataset has columns {calibration.column_names} but no `input_ids`: tokenize it "
                "first (e.g. `dataset.map(lambda r: tokenizer(r['text']))`) or pass a list of strings."
            )
        rows = [torch.as_tensor(ids) for ids in calibration["input_ids"]]
        if any(row.is_floating_point() for row in rows):
            raise ValueError(
                "Calibration `input_ids` hold non-integer values: token ids must be integers (tokenize the text "
                "with the anchors' tokenizer instead of casting)."
            )
        if "attention_mask" in calibration.column_names:  # padding is not text: keep the attended tokens only
            rows = [row[torch.as_tensor(mask).bool()] for row, mask in zip(rows, calibration["attention_mask"])]
        sequences = [row.long() for row in rows]
    else:
        raise TypeError(
            f"Unsupported calibration data of type {type(calibration).__name__}: pass a list of strings with a "
            "tokenizer, a tokenized datasets.Dataset, or a LongTensor of token ids."
        )

    # Long sequences are cut into max_length pieces rather than truncated: every token is usable.
    pieces = [seq[i : i + max_length] for seq in sequences for i in range(0, len(seq), max_length)]
    pieces = [p for p in pieces if len(p) > 1]
    if pieces and int(torch.cat(pieces).min()) < 0:
        raise ValueError(
            f"Calibration holds the negative token id {int(torch.cat(pieces).min())}: token ids count from 0; "
            "tokenize the text with the anchors' tokenizer."
        )
    if pieces and int(torch.cat(pieces).max()) >= vocab_size:
        raise ValueError(
            f"Calibration holds token id {int(torch.cat(pieces).max())} but the anchors' vocab_size is "
            f"{vocab_size}: tokenize it with the anchors' tokenizer."
        )
    usable = sum(len(p) - 1 for p in pieces)
    if usable < min_tokens:
        raise ValueError(
            f"Calibration data has {usable} usable tokens (padding and first positions excluded) but the "
            f"least-squares fit needs at least {min_tokens} (the small anchor's hidden size + 1): pass more text."
        )
    pieces.sort(key=len, reverse=True)  # less padding per batch
    batches = []
    for start in range(0, len(pieces), batch_size):
        group = pieces[start : start + batch_size]
        width = len(group[0])
        input_ids = torch.zeros(len(group), width, dtype=torch.long)
        attention_mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, piece in enumerate(group):
            input_ids[row, : len(piece)] = piece
            attention_mask[row, : len(piece)] = 1
        batches.append((input_ids, attention_mask))
    return batches


def ridge_solve(gram: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """`[d_in + 1, d_out]`: the `W` minimising ||XW - Y||^2 + lam ||W[:-1]||^2, from `gram = X^T X` and `xty = X^T Y`
    where X's last column is ones (the bias, not penalised); `lam` is `ridge` times the mean eigenvalue of X^T X."""
    penalty = torch.ones(len(gram), dtype=gram.dtype)
    penalty[-1] = 0.0
    lam = ridge * float(torch.diagonal(gram)[:-1].mean())
    return torch.linalg.solve(gram + lam * torch.diag(penalty), xty)


class _Stop(Exception):
    """Raised by a hook once the deepest layer needed has run: the rest of the forward would be wasted."""


def _anchor_states(
    model: nn.Module, batch: MaybeMasked, layers: Sequence[int], *, after: bool
) -> dict[int, torch.Tensor]:
    """One forward of `model`'s decoder stack up to the deepest layer needed.

    `after`: `{n: output of layer n - 1}` (the state after `n` layers, before the final norm); else
    `{j: input of layer j}`. Each tensor is `[batch, seq, hidden]`, on the model's device, in its dtype.
    """
    captured: dict[int, torch.Tensor] = {}
    blocks = model.model.layers

    def keep_output(n: int):
        def hook(module, args, output):
            captured[n] = output[0] if isinstance(output, tuple) else output

        return hook

    def keep_input(j: int):
        def hook(module, args, kwargs):
            captured[j] = args[0] if args else kwargs["hidden_states"]

        return hook

    def stop(*args):
        raise _Stop

    if after:
        handles = [blocks[n - 1].register_forward_hook(keep_output(n)) for n in layers]
        handles.append(blocks[max(layers) - 1].register_forward_hook(stop))  # runs after keep_output: same layer
    else:
        handles = [blocks[j].register_forward_pre_hook(keep_input(j), with_kwargs=True) for j in layers]
        handles.append(blocks[max(layers)].register_forward_pre_hook(stop))
    input_ids, attention_mask = batch
    device = model.get_input_embeddings().weight.device
    try:
        model.model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def capture_anchor_states(
    small: nn.Module | None,
    large: nn.Module | None,
    batches: Iterable[MaybeMasked],
    cuts: Iterable[int] = (),
    entries: Iterable[int] = (),
) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Per batch, `(small_states, large_states)`: the hidden states a stitch `(n, j)` joins.

    `small_states[n]` is the small anchor's output after `n` layers for each `n` in `cuts` (before the final norm,
    as the palette takes it), `large_states[j]` the large anchor's input to layer `j` for each `j` in `entries`;
    each `[batch, seq, hidden]` on that anchor's device and in its dtype. `small` and `large` are `*ForCausalLM`
    models; an anchor with no layer asked for (or None) is not run. Each forward stops after the deepest layer
    needed. `batches` holds `(input_ids, attention_mask)` pairs, the mask None for unpadded ids. Hooks live only
    during each anchor's forward, so the loop body may run the anchors itself.
    """
    cuts, entries = sorted(set(cuts)), sorted(set(entries))
    if (cuts and small is None) or (entries and large is None):
        raise ValueError("capture_anchor_states: layers were asked of an anchor passed as None.")
    for batch in batches:
        small_states = _anchor_states(small, batch, cuts, after=True) if cuts else {}
        large_states = _anchor_states(large, batch, entries, after=False) if entries else {}
        yield small_states, large_states


@torch.no_grad()
def fit_stitch_layers(
    small: nn.Module,
    large: nn.Module,
    stitch_layers: dict[str, nn.Linear],
    targets: dict[str, Sequence[tuple[int, int]]],
    batches: Iterable[Batch],
    *,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Fit each stitching layer by ridge least squares; returns its relative fit error ||XW - Y|| / ||Y||.

    `small` and `large` are the anchors' `*ForCausalLM` models; `targets[key]` lists the `(n, j)` stitches that
    share `stitch_layers[key]`. `ridge` is relative to the mean eigenvalue of X^T X (the bias is not penalised).
    """
    cuts = {n for pairs in targets.values() for n, _ in pairs}
    entries = {j for pairs in targets.values() for _, j in pairs}
    d_in = small.config.hidden_size + 1
    d_out = large.config.hidden_size
    xtx = defaultdict(lambda: torch.zeros(d_in, d_in, dtype=torch.float64))
    xty = defaultdict(lambda: torch.zeros(d_in, d_out, dtype=torch.float64))
    yty = defaultdict(float)
    batches = list(batches)
    states = capture_anchor_states(small, large, batches, cuts, entries)
    progress = logging.tqdm(batches, desc="Fitting stitching layers", unit="batch")
    for (_, attention_mask), (small_states, large_states) in zip(progress, states):
        usable = attention_mask.bool().clone()  # [batch, seq]: real tokens past the first
        usable[:, 0] = False
        for key, pairs in targets.items():
            for n, j in pairs:
                x = small_states[n][usable.to(small_states[n].device)].double().cpu()  # [tokens, d_small]
                x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [tokens, d_small + 1]
                y = large_states[j][usable.to(large_states[j].device)].double().cpu()  # [tokens, d_large]
                xtx[key] += x.T @ x
                xty[key] += x.T @ y
                yty[key] += float((y * y).sum())

    errors = {}
    for key, layer in stitch_layers.items():
        if key not in xtx:
            continue
        gram = xtx[key]
        w = ridge_solve(gram, xty[key], ridge)
        residual = float((w * (gram @ w)).sum() - 2 * (w * xty[key]).sum()) + yty[key]
        errors[key] = math.sqrt(max(residual, 0.0) / max(yty[key], 1e-30))
        layer.weight.copy_(w[:-1].T.to(layer.weight.dtype))
        layer.bias.copy_(w[-1].to(layer.bias.dtype))
    return errors


@torch.no_grad()
def fit_first_token_states(
    large: nn.Module, entries: Sequence[int], batches: Iterable[Batch]
) -> dict[int, torch.Tensor]:
    """The large anchor's mean hidden state entering each layer `j` in `entries` at the first token.

    The first token attends only to itself, so one-token forwards over the calibration sequences' first tokens
    give exactly its state in full-length runs. Returns float32 vectors on the CPU.
    """
    firsts = torch.cat([input_ids[:, :1] for input_ids, _ in batches])  # [sequences, 1]
    _, captured = next(capture_anchor_states(None, large, [(firsts, None)], entries=entries))
    return {j: captured[j][:, 0].float().mean(dim=0).cpu() for j in entries}  # each [d_large]

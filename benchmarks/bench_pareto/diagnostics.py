"""The optional diagnostics of the least-squares stitch (`--phases diag-pos0,diag-sink`); not library features.

They read the anchors' states through `stitched_llama.stitch_init.capture_anchor_states` and fit with
`stitched_llama.stitch_init.ridge_solve`, the library's own capture and solve, so they study the same problem.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch

from stitched_llama.stitch_init import capture_anchor_states, ridge_solve

from .data import calibration_chunks, heldout_chunks, text_chunks
from .evaluate import text_perplexity
from .measure import log
from .palette import hybrid_stitches, reloaded
from .settings import Run, Setting


@torch.no_grad()
def collect_states(
    palette: Any, ids: torch.LongTensor, pairs: list[tuple[int, int]], batch: int = 4, keep_first: bool = False
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """X[n]: small anchor after n layers, Y[j]: large anchor entering layer j, over the windows `ids` `[windows,
    seq]`; float64 on the CPU, `[windows * positions, hidden]`, position 0 dropped unless `keep_first`."""
    start = 0 if keep_first else 1
    batches = [(ids[i : i + batch], None) for i in range(0, len(ids), batch)]  # equal-length windows: no mask
    cuts, entries = {n for n, _ in pairs}, {j for _, j in pairs}
    xs: dict[int, list[torch.Tensor]] = defaultdict(list)
    ys: dict[int, list[torch.Tensor]] = defaultdict(list)
    for small_states, large_states in capture_anchor_states(palette.small, palette.large, batches, cuts, entries):
        for kept, states in ((xs, small_states), (ys, large_states)):
            for i, h in states.items():  # h: [batch, seq, hidden]
                kept[i].append(h[:, start:].reshape(-1, h.shape[-1]).double().cpu())
    return {n: torch.cat(v) for n, v in xs.items()}, {j: torch.cat(v) for j, v in ys.items()}


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """`[d_small + 1, d_large]`: the library's fit on states held in memory, so the diagnostics can filter them."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [tokens, d_small + 1]
    return ridge_solve(x1.T @ x1, x1.T @ y, ridge)


def _rel_err(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(x) == 0:
        return None
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return float((x1 @ w - y).norm() / y.norm())


@torch.no_grad()
def _set_layer(layer: torch.nn.Linear, w: torch.Tensor) -> None:
    """Load a `[d_in + 1, d_out]` solution (bias last) into a stitching layer."""
    layer.weight.copy_(w[:-1].T.to(layer.weight.dtype))
    layer.bias.copy_(w[-1].to(layer.bias.dtype))


def _full_rows(rows: list[dict], num: int) -> list[dict]:
    by_stitch = {r["stitch"]: r for r in rows}
    return [by_stitch.get(k, {"stitch": k, "loss": None, "perplexity": None, "tokens": None}) for k in range(num)]


def run_diag_pos0(run: Run) -> dict:
    """Diagnostic: held-out perplexity of the LS-init hybrids when position 0 after the stitching layer is replaced
    by the large anchor's mean position-0 state entering layer `j` (docs/concepts.md).

    Position 0 sees only its own token, so the large anchor's state there comes from a 1-token forward pass.
    """
    setting = run.setting
    init, tokenizer, palette = reloaded(run)
    calibration = calibration_chunks(run, tokenizer)
    stitches = [tuple(s) for s in palette.config.stitches]
    hybrids = hybrid_stitches(palette)
    firsts = [(calibration[:, :1], None)]  # [windows, 1]
    small_first, large_first = next(
        capture_anchor_states(
            palette.small, palette.large, firsts, {stitches[k][0] for k in hybrids}, {stitches[k][1] for k in hybrids}
        )
    )
    large_first = {j: h[:, 0] for j, h in large_first.items()}  # each [windows, d_large]
    constant = {j: h.mean(0) for j, h in large_first.items()}
    spread = {
        j: float((h - constant[j]).norm(dim=-1).mean() / constant[j].norm().clamp_min(1e-12))
        for j, h in large_first.items()
    }
    # Same statistic after the stitching layer (what the hybrid feeds the large anchor at position 0).
    stitched_gap = {}
    with torch.no_grad():
        for k in hybrids:
            n, j = stitches[k]
            layer = palette.stitch_layers[palette.config.stitch_layer_key(k)]
            mapped = layer(small_first[n].to(layer.weight.device))[:, 0]  # [windows, d_large]
            stitched_gap[k] = float((mapped - large_first[j]).norm(dim=-1).mean() / large_first[j].norm(dim=-1).mean())

    current: dict[str, int] = {}

    def remember(module, args, kwargs):  # the library's evaluation passes `stitch=k` to every forward
        current["stitch"] = kwargs["stitch"]

    def fix(module, args, output):
        if output.shape[1] > 1:  # a full window starting at position 0 (no cache in this evaluation)
            output = output.clone()
            output[:, 0] = constant[stitches[current["stitch"]][1]].to(output.dtype)
        return output

    fix_handles = [layer.register_forward_hook(fix) for layer in palette.stitch_layers.values()]
    fix_handles.append(palette.register_forward_pre_hook(remember, with_kwargs=True))
    data = heldout_chunks(run.sources, tokenizer, setting)
    result: dict[str, Any] = {
        "stitches": init["stitches"],
        "pos0_relative_spread_large": {str(j): v for j, v in spread.items()},
        "pos0_relative_gap_stitched": {str(k): v for k, v in stitched_gap.items()},
        "eval": {},
    }
    for name, chunks in data.items():
        log(f"held-out perplexity on {name}, position 0 mapped to the large anchor's constant")
        result["eval"][f"heldout_{name}"] = _full_rows(
            text_perplexity(palette, chunks, setting, stitches=hybrids), palette.num_stitches
        )
    for h in fix_handles:
        h.remove()
    try:
        result["outliers"] = outlier_diagnostic(palette, tokenizer, calibration, data["python_docs"], setting)
    except Exception as error:  # a diagnostic must not stop the run
        log(f"outlier diagnostic failed: {error!r}")
        result["outliers"] = {"error": repr(error)}
    return result


def outlier_diagnostic(
    palette: Any, tokenizer: Any, calibration: torch.LongTensor, heldout: torch.LongTensor, setting: Setting
) -> dict:
    """Do a few tokens with huge hidden-state norms (massive activations past position 0) dominate the LS fit?

    On half of the calibration windows: token norms of the fit targets, the library's fit (refitted on these windows)
    and a fit that leaves out tokens whose target norm exceeds 5x the median; relative errors on held-out windows,
    split into ordinary and outlier tokens; and held-out perplexity of the hybrids with the outlier-free fit.
    """
    stitches = [tuple(s) for s in palette.config.stitches]
    hybrids = hybrid_stitches(palette)
    pairs = [stitches[k] for k in hybrids]
    log("outlier diagnostic: collecting hidden states")
    xc, yc = collect_states(palette, calibration[::2], pairs)
    xh, yh = collect_states(palette, heldout, pairs)
    held_tokens = heldout[:, 1:].reshape(-1)
    rows, robust = {}, {}
    for k in hybrids:
        n, j = stitches[k]
        norms_c, norms_h = yc[j].norm(dim=1), yh[j].norm(dim=1)
        threshold = 5 * float(norms_c.median())
        out_c, out_h = norms_c > threshold, norms_h > threshold
        sq = (norms_c**2).sort(descending=True).values
        w_plain = _ridge_fit(xc[n], yc[j])
        w_robust = _ridge_fit(xc[n][~out_c], yc[j][~out_c])
        layer = palette.stitch_layers[palette.config.stitch_layer_key(k)]
        w_lib = torch.cat([layer.weight.detach().T, layer.bias.detach()[None]]).double().cpu()
        rows[str(k)] = {
            "n": n,
            "j": j,
            "target_norm_median": float(norms_c.median()),
            "target_norm_p99": float(norms_c.quantile(0.99)),
            "target_norm_max": float(norms_c.max()),
            "outlier_threshold": threshold,
            "outlier_share_calibration": float(out_c.float().mean()),
            "outlier_share_heldout": float(out_h.float().mean()),
            "sum_sq_share_top1pct": float(sq[: max(1, len(sq) // 100)].sum() / sq.sum()),
            "heldout_err_library_fit": _rel_err(w_lib, xh[n], yh[j]),
            "heldout_err_library_fit_ordinary": _rel_err(w_lib, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_library_fit_outliers": _rel_err(w_lib, xh[n][out_h], yh[j][out_h]),
            "heldout_err_refit_ordinary": _rel_err(w_plain, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_outlier_free_fit_ordinary": _rel_err(w_robust, xh[n][~out_h], yh[j][~out_h]),
            "heldout_err_outlier_free_fit_outliers": _rel_err(w_robust, xh[n][out_h], yh[j][out_h]),
            "outlier_tokens_heldout": sorted({tokenizer.decode([int(t)]) for t in held_tokens[out_h]})[:30],
        }
        robust[k] = w_robust
        log(f"  stitch {k} {(n, j)}: {json.dumps(rows[str(k)])}")
    for k, w in robust.items():
        _set_layer(palette.stitch_layers[palette.config.stitch_layer_key(k)], w)
    log("held-out perplexity with the outlier-free fit")
    ppl = text_perplexity(palette, heldout, setting, stitches=hybrids)
    for r in ppl:
        rows[str(r["stitch"])]["heldout_perplexity_outlier_free_fit"] = r["perplexity"]
    return {"calibration_tokens": len(yc[pairs[0][1]]), "heldout_tokens": len(yh[pairs[0][1]]), "stitches": rows}


def run_diag_sink(run: Run) -> dict:
    """Diagnostic: a sink-aware stitch. The small anchor's states with a massive norm (position 0 and the rare
    later attention-sink tokens) are mapped to the large anchor's mean state there; P_n is refitted on the other
    tokens only (same objective and ridge as the library). Held-out perplexity of the hybrids.
    """
    setting = run.setting
    init, tokenizer, palette = reloaded(run)
    calibration = calibration_chunks(run, tokenizer)
    heldout = text_chunks(run.sources.heldout["python_docs"], tokenizer, setting.heldout_seqs, setting.heldout_len)
    stitches = [tuple(s) for s in palette.config.stitches]
    hybrids = hybrid_stitches(palette)
    pairs = [stitches[k] for k in hybrids]
    log("sink diagnostic: collecting hidden states (position 0 kept)")
    xc, yc = collect_states(palette, calibration, pairs, keep_first=True)
    first = torch.zeros(len(calibration), calibration.shape[1], dtype=torch.bool)
    first[:, 0] = True
    first = first.reshape(-1)  # [windows * seq], True at each window's position 0
    rows, plans = {}, {}
    for k in hybrids:
        n, j = stitches[k]
        x_norm, y_norm = xc[n].norm(dim=1), yc[j].norm(dim=1)
        x_thr = 5 * float(x_norm[~first].median())
        y_thr = 5 * float(y_norm[~first].median())
        x_sink, y_sink = (x_norm > x_thr) & ~first, (y_norm > y_thr) & ~first
        ordinary = ~first & ~x_sink
        w = _ridge_fit(xc[n][ordinary], yc[j][ordinary])
        c_first = yc[j][first].mean(0)
        c_sink = yc[j][x_sink].mean(0) if x_sink.any() else c_first
        rows[str(k)] = {
            "n": n,
            "j": j,
            "small_norm_threshold": x_thr,
            "small_sinks": int(x_sink.sum()),
            "large_sinks": int(y_sink.sum()),
            "sinks_in_both": int((x_sink & y_sink).sum()),
            "first_position_large_norm_mean": float(y_norm[first].mean()),
            "cosine_first_vs_later_sinks": float(torch.nn.functional.cosine_similarity(c_first, c_sink, dim=0)),
            "calibration_tokens": int(len(first)),
        }
        plans[k] = (w, c_first, c_sink, x_thr)
        log(f"  stitch {k} {(n, j)}: {json.dumps(rows[str(k)])}")
    key_of = {palette.config.stitch_layer_key(k): k for k in hybrids}
    if len(key_of) != len(hybrids):
        raise ValueError("diag-sink assumes one hybrid per stitching layer; pass stitches with distinct n.")
    for key, k in key_of.items():
        _set_layer(palette.stitch_layers[key], plans[k][0])

    def sink_hook(k: int):
        _, c_first, c_sink, threshold = plans[k]

        def hook(module, args, output):
            x = args[0]
            output = output.clone()
            sinks = x.norm(dim=-1) > threshold
            output[sinks] = c_sink.to(output.dtype)
            if output.shape[1] > 1:  # a full window starting at position 0 (no cache in this evaluation)
                output[:, 0] = c_first.to(output.dtype)
            return output

        return hook

    for key, k in key_of.items():
        palette.stitch_layers[key].register_forward_hook(sink_hook(k))
    log("held-out perplexity with sink-aware stitching")
    ppl = text_perplexity(palette, heldout, setting, stitches=hybrids)
    for r in ppl:
        rows[str(r["stitch"])]["heldout_perplexity_sink_aware"] = r["perplexity"]
    return {"stitches": init["stitches"], "rows": rows}

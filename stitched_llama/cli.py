"""The `stitched-llama` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _tiny_anchor(hidden: int, layers: int, heads: int, kv_heads: int, seed: int, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def demo(args: argparse.Namespace) -> None:
    """Build a palette from two tiny random anchors, print its stitch table and generate with two stitches."""
    from .modeling_stitched_llama import StitchedLlamaForCausalLM

    small = _tiny_anchor(hidden=32, layers=4, heads=4, kv_heads=2, seed=args.seed)
    large = _tiny_anchor(hidden=64, layers=8, heads=8, kv_heads=2, seed=args.seed + 1)
    calibration = torch.randint(3, 128, (32, 64), generator=torch.Generator().manual_seed(args.seed))
    palette = StitchedLlamaForCausalLM.from_anchors(small, large, calibration=calibration)
    print(f"Palette of {palette.num_stitches} stitches between a 4-layer and an 8-layer anchor (random weights):\n")
    print(palette.format_stitch_table())
    print("\nRelative least-squares fit error per stitching layer:")
    print("  " + ", ".join(f"P_{k}: {v:.3f}" for k, v in palette.stitch_fit_errors.items()))
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    for k in (palette.num_stitches // 2, palette.num_stitches - 1):
        out = palette.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, stitch=k, pad_token_id=0)
        print(f"\nstitch {k} {tuple(palette.config.stitches[k])}: generated token ids {out[0, 5:].tolist()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stitched-llama", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    p.add_argument("--seed", type=int, default=0, help="seed of the random anchors and calibration tokens")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate per stitch")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

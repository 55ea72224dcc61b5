"""`stitched-llama chat`: talk to any stitch of a palette on stdin, switching stitches live."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import (
    CliError,
    add_command,
    context_limit,
    load_palette,
    loading_options,
    palette_argument,
    stitch_index,
    stitch_label,
    stitch_table,
)

DESCRIPTION = """\
Chat with a stitch of a palette, one message per line on stdin, replies streamed as they are generated.
The conversation is kept (the oldest turns are dropped when it outgrows the context).
In the chat: /stitches prints the stitch table (> marks the active stitch), /stitch K switches stitch,
/reset forgets the conversation, /quit (or Ctrl-D) ends."""
CHAT_HELP = "commands: /stitches (table), /stitch K (switch), /reset (forget the conversation), /quit; Ctrl-D ends"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parents = [palette_argument("palette folder (with its tokenizer)"), *loading_options()]
    p = add_command(subparsers, "chat", run, DESCRIPTION, parents=parents)
    p.add_argument("--stitch", metavar="K", help="stitch to start with; default: the palette's active stitch")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens (default 256)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    return p


def _render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, Any]:
    """The chat so far rendered as in training (`data.format_prompt`), and its token ids."""
    from ..data import format_prompt

    text = format_prompt({"messages": messages}, tokenizer)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None), return_tensors="pt")
    return text, ids["input_ids"]


def _generate(
    palette: Any,
    tokenizer: Any,
    input_ids: Any,
    stitch: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    streamer: Any = None,
) -> str:
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = palette.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = palette.generate(
            input_ids.to(device),
            attention_mask=torch.ones_like(input_ids).to(device),
            max_new_tokens=max_new_tokens,
            stitch=stitch,
            eos_token_id=eos,
            pad_token_id=pad,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    """Chat with any stitch of a palette on stdin; switch stitches live with /stitch K."""
    from transformers import TextStreamer

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise CliError(f"--temperature {args.temperature} must be 0 (greedy) or more")
    palette = load_palette(
        args.palette_dir, tokenizer=args.tokenizer, need_tokenizer=True, dtype=args.dtype, device=args.device
    )
    tokenizer = palette.tokenizer
    stitch = palette.active_stitch if args.stitch is None else stitch_index(palette, args.stitch)
    limit = context_limit(palette)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {stitch_label(palette, stitch)}; {CHAT_HELP}", flush=True)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/stitches":
                print(stitch_table(palette, active=stitch))
            elif command == "/stitch":
                try:
                    stitch = stitch_index(palette, argument.strip() or "?")
                    print(f"now chatting with {stitch_label(palette, stitch)}")
                except CliError as error:
                    print(f"error: {error}")
            elif command == "/reset":
                history = []
                print("conversation cleared")
            else:
                print(f"unknown command {command!r}; {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": line})
        _, input_ids = _render_prompt(tokenizer, system + history)
        while input_ids.shape[1] + args.max_new_tokens > limit and len(history) > 1:
            history = history[2:]  # forget the oldest exchange to stay within the anchors' context
            _, input_ids = _render_prompt(tokenizer, system + history)
        if input_ids.shape[1] + 1 > limit:
            print(f"error: this message alone is {input_ids.shape[1]} tokens, over the context of {limit}")
            history.pop()
            continue
        max_new = min(args.max_new_tokens, limit - input_ids.shape[1])
        print(f"[stitch {stitch}] ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = _generate(palette, tokenizer, input_ids, stitch, max_new, args.temperature, streamer)
        history.append({"role": "assistant", "content": reply})

"""Cost of the distillation loss against the cross-entropy it is mixed with, per teacher form.

    python benchmarks/bench_distill_loss.py --threads 2

One forward and backward pass of each loss over the same random student and teacher logits (timing does not depend
on the values), at the built-in family's training shapes by default (8 x 256 tokens, vocabulary 4096):

- `cross-entropy`: `causal_lm_loss`, the labels alone;
- `KD, whole vocabulary`: `distill_top_k=None`, the default (teacher ids None: no gather, no renormalisation);
- `KD, top-k = vocabulary`: the same distribution through the top-k path (gather and renormalisation), as every
  whole-vocabulary teacher ran before the two paths were split;
- `KD, top-k`: the teacher cut to its `--top-k` tokens (`distill_top_k`, needed by `distill_cache`).

Reported: the median time over `--repeats` calls after one warm-up, and its ratio to the cross-entropy's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stitched_llama.distillation import causal_lm_loss, distillation_loss, teacher_topk

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=generator, requires_grad=True)  # [batch, seq, vocab]
    teacher = torch.randn(shape, generator=generator)  # [batch, seq, vocab]
    labels = torch.randint(0, args.vocab, shape[:2], generator=generator)  # [batch, seq]
    losses = {
        "cross-entropy": lambda: causal_lm_loss(student, labels),
        "KD, whole vocabulary": lambda: distillation_loss(student, *teacher_topk(teacher, 1.0, None), labels),
        "KD, top-k = vocabulary": lambda: distillation_loss(student, *teacher_topk(teacher, 1.0, args.vocab), labels),
        f"KD, top-{args.top_k}": lambda: distillation_loss(student, *teacher_topk(teacher, 1.0, args.top_k), labels),
    }
    # The teacher's log-softmax is inside each KD call: a live teacher pays it every step, as here.
    times = {}
    for name, loss in losses.items():
        samples = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            loss().backward()
            samples.append(time.perf_counter() - start)
            student.grad = None
        times[name] = statistics.median(samples[1:])
    print(
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, fp32, logits {list(shape)}, "
        f"median of {args.repeats}\n\n| loss | ms (forward + backward) | vs cross-entropy |\n|---|---:|---:|"
    )
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / times['cross-entropy']:.2f}x |")


if __name__ == "__main__":
    main()

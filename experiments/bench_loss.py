"""Benchmark the chunked PRIOR loss against a naive fp32 cross-entropy, forward + backward.

The naive loss is what most training code writes: ``F.cross_entropy(logits.float().view(-1, V),
...)`` over every position, then per-caption normalised weights. Both run in one process on the
same inputs; the table reports time and, on a GPU, the peak memory a step adds on top of the
logits (``torch.cuda.max_memory_allocated``). On CPU only time is measured.

    python experiments/bench_loss.py                       # GPU: B=4 T=1024 V=128256 bf16
    python experiments/bench_loss.py --device cpu          # CPU: B=4 T=256 V=32000 fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prior.loss import effective_weights, prior_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """PRIOR with a full-size fp32 copy of the logits and a full-size log-softmax."""
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1), reduction="none", ignore_index=-100)
    return (ce * effective_weights(weights, mask).view(-1)).sum() / mask.sum().clamp(min=1)


def chunked_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """prior.loss.prior_loss."""
    return prior_loss(logits, targets, weights, mask)


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Logits, targets (-100 off the mask), weights and a loss mask covering the tail of each row."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(args.batch, args.length, args.vocab, generator=gen).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen)
    start = int(args.length * (1 - args.loss_frac))
    mask = torch.zeros(args.batch, args.length, dtype=torch.bool)
    mask[:, start:] = True
    targets[~mask] = -100
    weights = torch.rand(args.batch, args.length, generator=gen)
    return logits, targets.to(device), weights.to(device), mask.to(device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: LossFn, inputs, device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Median fwd+bwd time (ms), peak extra memory (MiB, GPU only), the loss and the logits' grad."""
    logits, targets, weights, mask = inputs
    leaf = logits.detach().requires_grad_()
    times, peak = [], 0.0 if device.type == "cuda" else float("nan")
    for step in range(warmup + iters):
        leaf.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sync(device)
        start = time.perf_counter()
        loss = fn(leaf, targets, weights, mask)
        loss.backward()
        sync(device)
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
            if device.type == "cuda":
                peak = max(peak, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {"ms": statistics.median(times), "peak_mib": peak, "loss": loss.item(), "grad": leaf.grad}


def main() -> None:
    """Parse the sizes, run both losses and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, help="sequence length T; default 1024 on GPU, 256 on CPU")
    parser.add_argument("--vocab", type=int, help="vocabulary size V; default 128256 on GPU, 32000 on CPU")
    parser.add_argument("--loss-frac", type=float, default=0.5, help="fraction of positions carrying loss")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.length = args.length or (1024 if gpu else 256)
    args.vocab = args.vocab or (128256 if gpu else 32000)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if gpu else "fp32")]

    inputs = make_inputs(args, device, dtype)
    logits_mib = inputs[0].numel() * inputs[0].element_size() / 2**20
    naive = measure(naive_loss, inputs, device, args.iters, args.warmup)
    chunked = measure(chunked_loss, inputs, device, args.iters, args.warmup)

    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device={name} dtype={dtype} B={args.batch} T={args.length} V={args.vocab} "
          f"loss_frac={args.loss_frac} logits={logits_mib:.0f} MiB iters={args.iters}")
    print(f"{'impl':<10}{'fwd+bwd ms':>12}{'peak extra MiB':>16}{'loss':>12}")
    for label, row in (("naive", naive), ("prior", chunked)):
        print(f"{label:<10}{row['ms']:>12.1f}{row['peak_mib']:>16.0f}{row['loss']:>12.6f}")
    print(f"{'prior/naive':<10}{chunked['ms'] / naive['ms']:>12.2f}{chunked['peak_mib'] / naive['peak_mib']:>16.2f}")
    if not gpu:
        print("peak memory is measured on GPU only (torch.cuda.max_memory_allocated); run with --device cuda")
    grad_diff = (naive["grad"].float() - chunked["grad"].float()).abs().max().item()
    print(f"|loss diff| = {abs(naive['loss'] - chunked['loss']):.2e}   max |grad diff| = {grad_diff:.2e}")


if __name__ == "__main__":
    main()

"""Benchmark: fused chunked token log-probs (logprobs.py) vs. materialising the logits.

Methods, each doing forward + backward of sum(advantage * logp) for one micro-batch:
  naive            log_softmax(hidden @ W.T / T).gather(targets): the whole [tokens, vocab] logits,
                   their log_softmax, and in backward a dense one-hot gradient and the softmax gradient.
  rowloop          what TRL's selective_log_softmax does: the logits are still materialised by one
                   matmul, but log_softmax + gather run one sequence (row of the batch) at a time, so
                   only one row's softmax copy exists at once. Rows are sequences of SEQ_LEN tokens.
  fused            token_logprobs with its defaults (frozen weight: hidden gradient built in forward).
  fused_recompute  token_logprobs(hidden_grad_in_forward=False): backward recomputes every logits block,
                   the Liger / Cut Cross-Entropy scheme; shows what the forward-side gradient saves.
By default the lm_head is frozen (QLoRA / LoRA: only hidden needs a gradient); --trainable adds runs
where the weight is trained too (tied embeddings).

How peak memory is measured (CPU). tracemalloc does not see torch's allocations and torch.profiler's
CPU memory view is per-op, so we measure the process: every (method, repeat) runs in a fresh
subprocess, which (1) builds the inputs, (2) runs the method once on a tiny problem so one-time
library allocations (oneDNN/MKL buffers, thread pools) are not counted, (3) resets the kernel's
peak-RSS counter by writing "5" to /proc/self/clear_refs and records the current RSS as the baseline,
(4) runs the measured step, (5) reads VmHWM (peak RSS) from /proc/self/status. Peak beyond inputs =
VmHWM - baseline. torch's CPU allocator does not cache, and large blocks are mmapped, so RSS tracks
live tensors closely. If clear_refs is not writable we fall back to getrusage's ru_maxrss (which
then includes warm-up peaks, so numbers can only be overestimates for small methods). With CUDA
one would use torch.cuda.max_memory_allocated instead. The gradient w.r.t. hidden ([tokens,
hidden]) is part of every method's peak.

Timing: wall time of the measured step in each fresh process; we report the median over repeats.
Methods are interleaved (naive, rowloop, fused, ... then the next repeat) so load from other
processes on a shared machine hits all of them alike.

Defaults: float32, because this CPU (AVX2, no AVX512-BF16/AMX) runs bf16 matmuls ~13x slower than
fp32, which would make the large size take hours; --dtype bfloat16 works but slowly. The large size
(4096 tokens, hidden 4096, Llama-3 vocab 128256) is ~4.3 TFLOP per matmul; on 2 cores each run
takes about a minute, so it runs --large-repeats times (default 1) and the whole script takes a
few minutes. The naive method needs ~7 GB there in fp32.

    python bench/logprobs.py --sizes all --repeats 3
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanowaltz.logprobs import naive_token_logprobs, token_logprobs  # noqa: E402

SIZES = {"small": (2048, 576, 49152), "large": (4096, 4096, 128256)}  # (tokens, hidden, vocab)
SEQ_LEN = 512  # tokens per sequence for the row loop
TEMPERATURE = 1.0
METHODS = ("naive", "rowloop", "fused", "fused_recompute")


def rowloop_token_logprobs(hidden, weight, targets, temperature=1.0):
    """TRL-style: one matmul for all logits, then log_softmax + gather one sequence at a time."""
    logits = hidden @ weight.T  # [rows, seq, vocab], materialised
    per_row = []
    for row_logits, row_targets in zip(logits, targets):
        row_logp = (row_logits.float() / temperature).log_softmax(-1)
        per_row.append(row_logp.gather(-1, row_targets[:, None]).squeeze(-1))
    return torch.stack(per_row)


def run_method(method, hidden, weight, targets, advantages, chunk_size, vocab_chunk_size):
    """One forward + backward; hidden is a leaf [rows, seq, H]."""
    if method == "naive":
        logp = naive_token_logprobs(hidden, weight, targets, TEMPERATURE)
    elif method == "rowloop":
        logp = rowloop_token_logprobs(hidden, weight, targets, TEMPERATURE)
    else:
        logp = token_logprobs(hidden, weight, targets, TEMPERATURE, chunk_size=chunk_size,
                              vocab_chunk_size=vocab_chunk_size, hidden_grad_in_forward=(method == "fused"))
    (logp * advantages).sum().backward()


def _status_kb(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def make_inputs(tokens, hidden_size, vocab, dtype, trainable, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // SEQ_LEN)
    hidden = torch.randn(rows, tokens // rows, hidden_size, generator=gen, dtype=dtype).requires_grad_(True)
    # Scaled so logits have std ~2, like a trained model's, and the softmax is not degenerate.
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=dtype) * (2 / hidden_size ** 0.5))
    weight.requires_grad_(trainable)
    targets = torch.randint(0, vocab, (rows, tokens // rows), generator=gen)
    advantages = torch.randn(rows, tokens // rows, generator=gen)
    return hidden, weight, targets, advantages


def worker(args):
    """Runs in a fresh process: warm up tiny, reset peak RSS, run once, print one JSON line."""
    dtype = getattr(torch, args.dtype)
    tokens, hidden_size, vocab = SIZES[args.size]
    tiny = make_inputs(SEQ_LEN * 2, hidden_size, 1024, dtype, args.trainable)
    run_method(args.method, *tiny, args.chunk_size, args.vocab_chunk_size)
    del tiny
    inputs = make_inputs(tokens, hidden_size, vocab, dtype, args.trainable)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        baseline_kb, method = _status_kb("VmRSS"), "VmHWM"
    except OSError:
        baseline_kb, method = _status_kb("VmRSS"), "ru_maxrss"
    start = time.perf_counter()
    run_method(args.method, *inputs, args.chunk_size, args.vocab_chunk_size)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": (peak_kb - baseline_kb) / 1024, "memory_method": method}))


def spawn(size, method, trainable, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", size, "--method", method,
           "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
           "--vocab-chunk-size", str(args.vocab_chunk_size)] + (["--trainable"] if trainable else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {size}/{method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=("small", "large", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per method (small size)")
    parser.add_argument("--large-repeats", type=int, default=1, help="runs per method at the large size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--trainable", action="store_true", help="also benchmark a trainable lm_head")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--vocab-chunk-size", type=int, default=8192)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown or "naive" not in methods:
        parser.error(f"--methods must include naive and only use {METHODS}; got {args.methods}")
    sizes = list(SIZES) if args.sizes == "all" else [args.sizes]
    print(f"dtype={args.dtype} chunk={args.chunk_size}x{args.vocab_chunk_size} threads={torch.get_num_threads()} "
          f"temperature={TEMPERATURE}")
    rows = []
    for size in sizes:
        for trainable in ([False, True] if args.trainable else [False]):
            results = {m: [] for m in methods}
            for _ in range(args.repeats if size == "small" else args.large_repeats):
                for m in methods:  # interleaved, see docstring
                    results[m].append(spawn(size, m, trainable, args))
                    print(f"  {size} {'trainable' if trainable else 'frozen'} {m}: {results[m][-1]}", flush=True)
            naive_s = statistics.median(r["seconds"] for r in results["naive"])
            naive_mb = max(r["peak_mb"] for r in results["naive"])
            for m in methods:
                s = statistics.median(r["seconds"] for r in results[m])
                mb = max(r["peak_mb"] for r in results[m])
                rows.append((size, "trainable" if trainable else "frozen", m, len(results[m]), s, mb,
                             s / naive_s, 1 - mb / naive_mb))

    print(f"\n{'size':6} {'lm_head':9} {'method':16} {'n':>2} {'time s':>8} {'peak MB':>9} {'time/naive':>10} "
          f"{'mem saved':>9}")
    for size, head, m, n, s, mb, time_ratio, saved in rows:
        print(f"{size:6} {head:9} {m:16} {n:2d} {s:8.2f} {mb:9.1f} {time_ratio:10.2f} {saved:9.1%}")
    print("\ntargets for fused: >= 95% less peak memory than naive, time/naive <= 1.00")
    for size, head, m, n, s, mb, time_ratio, saved in rows:
        if m != "fused":
            continue
        verdict_mem = "met" if saved >= 0.95 else f"MISSED by {0.95 - saved:.1%}"
        verdict_time = "met" if time_ratio <= 1.0 else f"MISSED: {time_ratio - 1:.0%} slower"
        print(f"  {size} {head}: memory {verdict_mem}, time {verdict_time}")


if __name__ == "__main__":
    main()

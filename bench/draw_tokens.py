"""Benchmark: how the sampler draws one token per row (sampler.draw_tokens), against the alternatives, for speed and
for stability under float noise.

Three ways to draw from softmax probabilities over the default model's 49,152-token vocabulary:
    race          sampler.draw_tokens: argmax p / E with E = -log(U), U from torch.rand (the exponential race)
    inverse-cdf   a uniform number located in the running sum (float64 cumsum + searchsorted)
    multinomial   torch.multinomial(p, 1)
All three draw from the same distribution. Speed: median milliseconds per call at each batch size. Stability: two
forwards that differ only in float rounding (the prefix-cached and the plain path; ~2e-6 in total variation on the
default model) should draw the same token from the same random numbers; we perturb the logits by --noise and count,
from one seed, the rows whose token changed. (multinomial is not in that column: its random stream is its own.)

    python bench/draw_tokens.py            # a few seconds
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanowaltz import cpu_threads  # noqa: E402, F401  (before torch, as train.py does)
import torch  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from nanowaltz.sampler import draw_tokens  # noqa: E402


def inverse_cdf(probs):
    cumulative = probs.double().cumsum(-1)
    uniform = torch.rand(cumulative[:, -1:].shape, dtype=torch.float64) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


METHODS = {"race": draw_tokens, "inverse-cdf": inverse_cdf, "multinomial": lambda p: torch.multinomial(p, 1)[:, 0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's)")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per method and batch")
    parser.add_argument("--noise", type=float, default=1e-5, help="logit perturbation for the stability column")
    parser.add_argument("--rows", type=int, default=1000, help="rows in the stability check")
    args = parser.parse_args(argv)
    print(machine_info())
    print(f"{'batch':>5} | " + " | ".join(f"{name + ' ms':>15}" for name in METHODS))
    for batch in (int(b) for b in args.batches.split(",")):
        probs = torch.softmax(torch.randn(batch, args.vocab) * 3.0, -1)
        medians = []
        for method in METHODS.values():
            times = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                method(probs)
                times.append(time.perf_counter() - began)
            medians.append(1000 * statistics.median(times))
        print(f"{batch:>5} | " + " | ".join(f"{m:>15.2f}" for m in medians))
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3.0
    probs, perturbed = torch.softmax(logits, -1), torch.softmax(logits + args.noise * torch.randn_like(logits), -1)
    print(f"stability: {args.rows} rows, logits perturbed by {args.noise:g} (total variation "
          f"{0.5 * (probs - perturbed).abs().sum(-1).mean():.1e}); rows whose token changed, same seed:")
    for name in ("race", "inverse-cdf"):
        torch.manual_seed(1)
        first = METHODS[name](probs)
        torch.manual_seed(1)
        second = METHODS[name](perturbed)
        print(f"  {name}: {(first != second).sum().item()} of {args.rows}")


if __name__ == "__main__":
    main()

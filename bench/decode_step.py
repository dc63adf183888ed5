"""Benchmark: one decoding step of sampler.sample against a bare model forward of the same shape, over batch sizes.

Three numbers per batch size B, all on B copies of one feedback-agent context (its ~240-token system prompt, a
request, an answer and the '{"unsafe":' prefill; the length a decoding step attends to in a rollout):

    sample      seconds per step of sampler.sample (sampling at temperature 1, log-probs, per-row bookkeeping, the
                growing attention mask, DynamicCache), from the difference of two calls that decode 1 and 1 + n
                tokens (stop tokens are switched off, so both decode exactly that many)
    bare        seconds per model forward of the same shape: [B, 1] tokens on the same DynamicCache, nothing else
    static      the same bare forward on a preallocated transformers StaticCache (no concatenation of the KV tensors
                every step); if it is clearly faster, preallocating is worth doing in sample()

and from them: sampler overhead = sample / bare - 1 (what the Python loop adds), tok/s = B / sample step, and the
step's cost relative to batch 1. While decoding is bound by reading the weights from memory the step costs about the
same at any batch and tok/s grows linearly with B; where "x batch 1" starts to grow, the step has become bound by
arithmetic, and larger batches stop paying. Identical rows let the whole context but its last token be one shared
prefix (sampler.SharedPrefix), so no batch-sized prefill is paid before the timed steps.

Run on its own or as the `step` part of bench/rollout.py:
    python bench/decode_step.py --batches 1,4,16,64 --steps 8
"""
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from nanowaltz import cpu_threads  # noqa: E402, F401  (before torch: the project's OpenMP defaults)
import torch  # noqa: E402

import rollout  # noqa: E402
from nanowaltz import sampler  # noqa: E402
from nanowaltz.base_model import cache_keyword
from nanowaltz.models import use_agent  # noqa: E402


def feedback_context(tokenizer) -> list:
    prompt = "What is a good way to learn to cook simple meals at home?"
    answer = ("Start with a few recipes you like, such as pasta, soups and stir-fries, and cook each one several "
              "times. Keep a small set of staples at home and learn basic knife skills.")
    return sampler.chat_ids(tokenizer, rollout.feedback_messages(prompt, answer), rollout.FEEDBACK_PREFILL)


def sample_step_seconds(model, tokenizer, context, prefix, batch, steps) -> float:
    """Seconds per decoding step of sampler.sample: (t(1 + steps tokens) - t(1 token)) / steps."""
    real_stops = sampler.stop_token_ids
    sampler.stop_token_ids = lambda m, t: set()  # every row decodes exactly max_new_tokens
    try:
        times = {}
        for tokens in (1, 1 + steps, 1, 1 + steps):  # twice each, interleaved; the faster of each pair counts
            began = time.perf_counter()
            sampler.sample(model, tokenizer, [context] * batch, tokens, temperature=1.0, prefix=prefix)
            times[tokens] = min(times.get(tokens, float("inf")), time.perf_counter() - began)
    finally:
        sampler.stop_token_ids = real_stops
    return max(times[1 + steps] - times[1], 0.0) / steps


@torch.no_grad()
def bare_step_seconds(model, context, prefix, batch, steps, static=False) -> float:
    """Median seconds per bare forward of [batch, 1] tokens on a KV cache holding the context (Dynamic or Static)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    length = len(context)
    if static:
        cache = StaticCache(config=model.config, max_cache_len=length + steps + 1)
        for index, layer in enumerate(prefix.cache.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index)
    else:
        cache = sampler.batch_cache(model, prefix, batch)
    mask = torch.ones((batch, (length + steps + 1) if static else (length + steps)), dtype=torch.long, device=device)
    tokens = torch.full((batch, 1), context[-1], dtype=torch.long, device=device)
    seconds = []
    for step in range(steps):
        position = len(prefix.ids) + step
        began = time.perf_counter()
        model(input_ids=tokens, attention_mask=mask if static else mask[:, :position + 1],
              position_ids=torch.full((batch, 1), position, dtype=torch.long, device=device), use_cache=True,
              logits_to_keep=1, **{cache_keyword(model): cache})
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[1:] if steps > 1 else seconds)  # the first step pays one-off allocations


def bench_steps(model, tokenizer, batches, steps, agent="feedback") -> list:
    use_agent(model, agent)
    model.eval()
    context = feedback_context(tokenizer)
    prefix = sampler.prefix_kv(model, context[:-1])  # identical rows: all but the last token is shared
    rows = []
    for batch in batches:
        sample_s = sample_step_seconds(model, tokenizer, context, prefix, batch, steps)
        bare_s = bare_step_seconds(model, context, prefix, batch, steps)
        static_s = bare_step_seconds(model, context, prefix, batch, steps, static=True)
        rows.append({"batch": batch, "sample_s": sample_s, "bare_s": bare_s, "static_s": static_s})
        print(f"  step, batch {batch}: sample {1000 * sample_s:.1f} ms, bare {1000 * bare_s:.1f} ms, static "
              f"{1000 * static_s:.1f} ms", flush=True)
    return rows


def print_steps(rows, context_tokens, steps):
    print(f"\n## Decoding step vs batch size (feedback agent, context {context_tokens} tokens, {steps} timed steps)")
    head = (f"{'batch':>5} | {'sample ms':>9} | {'bare ms':>7} | {'overhead':>8} | {'static ms':>9} | "
            f"{'static/bare':>11} | {'tok/s':>7} | {'x batch 1':>9}")
    print(head + "\n" + "-" * len(head))
    first = rows[0]["sample_s"] or float("nan")
    for r in rows:
        sample_s = r["sample_s"] or float("nan")
        print(f"{r['batch']:>5} | {1000 * r['sample_s']:>9.1f} | {1000 * r['bare_s']:>7.1f} | "
              f"{100 * (sample_s / r['bare_s'] - 1):>7.1f}% | {1000 * r['static_s']:>9.1f} | "
              f"{r['static_s'] / r['bare_s']:>11.2f} | {r['batch'] / sample_s:>7.1f} | {sample_s / first:>9.2f}")
    print("sample = one step of sampler.sample; bare = the model forward alone (DynamicCache); overhead = sample / "
          "bare - 1; static = bare forward on a preallocated StaticCache; tok/s = batch / sample step; x batch 1 = "
          "step time / the first row's. Weight-bound while 'x batch 1' stays near 1.")


def main(argv=None):
    import argparse

    from nanowaltz.base_model import DEFAULT_MODEL
    from nanowaltz.models import load_agents_or_fresh

    parser = argparse.ArgumentParser(description="One decoding step of sampler.sample vs a bare forward, by batch.")
    parser.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=8, help="timed decoding steps per measurement (>= 2)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model ('default' = SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.steps < 2:
        parser.error("--batches must be >= 1 and --steps >= 2")
    model, tokenizer = load_agents_or_fresh(args.model)
    print_steps(bench_steps(model, tokenizer, batches, args.steps), len(feedback_context(tokenizer)), args.steps)


if __name__ == "__main__":
    main()

"""The feedback agent's latency overhead at inference: the conversation agent alone against both agents, with and
without early stopping of "ok" feedback, at batch 1 on the everyday prompts of the eval split.

    python bench/overhead.py --adapters runs/waltzrl/adapters --n 10

Greedy decoding makes c_0 identical in all three deployments, so the differences are the feedback turn and any
revision. bench/rollout.py --parts latency measures the same with a within-call estimate as well.
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

sys.path = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from nanowaltz import cpu_threads  # noqa: F401,E402  (first: OpenMP reads its wait settings when torch loads)
from nanowaltz.cli import parse  # noqa: E402
from nanowaltz.base_model import DEFAULT_MODEL
from nanowaltz.models import load_agents_or_fresh  # noqa: E402
from infer import answer_prompts, generation_limits, inference_config  # noqa: E402
from rollout import RolloutConfig  # noqa: E402


def measure_overhead(model, tokenizer, prompts: list, config: RolloutConfig) -> dict:
    """Median wall time per prompt (batch 1) of three deployments on the same prompts: the conversation agent alone,
    both agents with early stopping of 'ok' feedback, both agents without it. Greedy decoding makes c_0 identical in
    all three, so the differences are the feedback turn and any revision. Modes are interleaved per prompt (and their
    order rotated) so that a machine slowing down mid-run does not bias one mode. All modes share one prefix cache,
    as a deployed process does (its system prompts are run once, in the warm-up)."""
    prefix_cache = {}
    modes = {"conversation agent alone": (False, config),
             "with feedback agent, early stop": (True, replace(config, early_stop_ok=True)),
             "with feedback agent, no early stop": (True, replace(config, early_stop_ok=False))}
    names = list(modes)
    warm_up = replace(config, conversation_max_new_tokens=4, feedback_max_new_tokens=4)
    answer_prompts(model, tokenizer, prompts[:1], warm_up, True, prefix_cache)  # one-off costs: allocation, prefix
    results = {name: {"seconds": [], "tokens": [], "triggered": []} for name in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % 3:] + names[:i % 3]:
            use_feedback, mode_config = modes[name]
            began = time.perf_counter()
            reply = answer_prompts(model, tokenizer, [prompt], mode_config, use_feedback, prefix_cache)[0]
            results[name]["seconds"].append(time.perf_counter() - began)
            results[name]["tokens"].append(reply.tokens)
            results[name]["triggered"].append(reply.triggered)
        print(f"  prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{results[n]['seconds'][-1]:.1f}s" for n in names), flush=True)
    alone = statistics.median(results[names[0]]["seconds"])
    summary = {}
    for name in names:
        median = statistics.median(results[name]["seconds"])
        summary[name] = {"median_seconds": median, "ratio_to_alone": median / alone,
                         "mean_tokens": statistics.fmean(results[name]["tokens"]),
                         "ftr": statistics.fmean(results[name]["triggered"]), "per_prompt": results[name]}
    return summary


def format_overhead(summary: dict, n: int) -> str:
    lines = [f"Feedback-agent overhead, {n} prompts, batch 1, median wall time per prompt:",
             f"  {'deployment':36s} {'median s':>9s} {'x alone':>8s} {'mean tokens':>12s} {'FTR':>6s}"]
    for name, row in summary.items():
        lines.append(f"  {name:36s} {row['median_seconds']:9.2f} {row['ratio_to_alone']:8.2f} "
                     f"{row['mean_tokens']:12.1f} {100 * row['ftr']:5.1f}%")
    return "\n".join(lines)



@dataclass
class OverheadArgs:
    model: str = DEFAULT_MODEL  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    adapters: str | None = None  # trained adapters (train.py output); default: fresh adapters
    prompts: str = "data/prompts.jsonl"  # prompt file: its eval split's everyday prompts are used
    n: int | None = None  # use the first N everyday prompts (default: all)
    max_new_tokens: int | None = None  # answer length limit (default: the training run's, else 128)
    feedback_max_new_tokens: int | None = None  # feedback JSON length limit (default: the training run's, else 96)
    max_rounds: int = 1  # T_max feedback rounds


def main(argv=None) -> int:
    from nanowaltz.data import load_prompts

    args = parse(OverheadArgs, "The feedback agent's latency overhead at batch 1 (median wall time per prompt).", argv)
    max_new, feedback_max_new = generation_limits(args.adapters, args.max_new_tokens, args.feedback_max_new_tokens)
    everyday = [r["prompt"] for r in load_prompts(args.prompts, split="eval") if r["category"] == "everyday"]
    if not everyday:
        raise SystemExit(f"--prompts {args.prompts}: no eval prompts with category 'everyday'")
    everyday = everyday[:args.n] if args.n else everyday
    model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
    summary = measure_overhead(model, tokenizer, everyday, inference_config(0.0, max_new, feedback_max_new, True,
                                                                             args.max_rounds, 1))
    print(format_overhead(summary, len(everyday)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what generation costs (rollout.py), and what the feedback agent adds to it, in one run.

WaltzRL (arXiv 2510.08240; docs/method.md "Rollout" and "Inference") adds a second agent that reads every answer, so
each prompt costs c_0, then f_0, then (only if f_0 flags c_0) a revision c_1. Every comparison below is measured
back-to-back in the same process, because the machine may be shared and absolute numbers drift: read the ratios.
Four parts (--parts picks some):

1. step: one decoding step of sampler.sample against a bare model forward of the same shape (the sampler's own
   overhead), a preallocated StaticCache against the DynamicCache, and tokens/s against the batch size: where the
   step stops being bound by reading the weights (bench/decode_step.py has the details).
2. throughput (training-style rollouts). For each batch size B: tokens/s of `rollout.rollout` (default
   RolloutConfig: sampling at temperature 1, T_max = 1, early stop on, shared-prefix cache on; only the token limits
   are set by flags) against `rollout.run_agent` with the conversation agent alone on the same contexts, the same
   rollout with the shared-prefix cache off (RolloutConfig(share_prefix=False)), and with the feedback JSON's keys
   not drafted (RolloutConfig(draft_feedback_keys=False)). Generated tokens are counted from the Turn records (c_0 +
   f_0 + c_1). All arms start from the same seed, so the single-agent answers are exactly the rollout's c_0, and the
   rollout without the cache samples exactly the same tokens (both checked and printed); without drafts the feedback
   turns draw other random numbers, so they sample other tokens from the same distributions.
3. latency on everyday prompts (category "everyday", eval split; what a deployed system mostly sees): per-prompt
   wall time at batch 1, greedy decoding for both agents, with one prefix cache for the whole run as infer.py keeps
   one per process, of
       alone        conversation agent only (RolloutConfig(max_rounds=0))
       fb+early     conversation + feedback, early_stop_ok on (decoding stops once both labels are false)
       fb+early/nodraft   the same without drafting the JSON keys (one forward per feedback token)
       fb+full      conversation + feedback, early_stop_ok off (the feedback agent writes its whole JSON)
       fb+ok-floor  conversation + a feedback turn cut after the tokens of ' false, "overrefuse": false': what an
                    agent that approves the answer costs with early stop (the floor of the protocol)
   and, without the prefix cache, alone/nocache and fb+ok-floor/nocache (what the cache saves per prompt). The arms
   are interleaved per prompt and repeat; we report the median over prompts of each prompt's median latency, the
   ratio to "alone" (to "alone/nocache" for the nocache arm) and the overhead in %, against the target of <= 15%.
   Greedy decoding makes c_0 identical in all arms, so the difference is the feedback agent (+ revisions). A second
   estimate of the same overhead is read inside each call: (feedback turn + revision seconds) / c_0 seconds of the
   same trajectory, median over prompts. Its two parts are timed seconds apart, so drift of the machine's speed
   between arms (which the end-to-end ratio sees as noise of several %) mostly cancels.

By default the adapters are untrained (zero), so both agents are the base model; --adapters measures a trained pair.
The untrained 135M feedback agent rarely says "ok" to anything, so early stop rarely fires and it decodes up to its
limit; a trained agent that approves everyday answers (the paper's FTR on AlpacaEval is 6.7%) approaches fb+ok-floor.

Defaults are sized for about 5 minutes on an idle 2-core CPU with the default model. The bigger grid (batches up to 64
for both agents, up to 128 for the step) takes far longer:

    HF_HUB_OFFLINE=1 python bench/rollout.py
    HF_HUB_OFFLINE=1 python bench/rollout.py --step-batches 1,2,4,8,16,32,64,128 --batches 1,8,32,64 --n-prompts 8
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

# Run as `python bench/rollout.py`, sys.path[0] is bench/, where THIS file would shadow the project's rollout.py.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from nanowaltz import cpu_threads  # noqa: E402  (before torch: the project's OpenMP defaults, as train.py and infer.py)
import torch  # noqa: E402

from bench.decode_step import bench_steps, feedback_context, print_steps  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from nanowaltz.data import load_prompts  # noqa: E402
from nanowaltz.feedback_json import labels_prefix_complete  # noqa: E402
from nanowaltz.base_model import DEFAULT_MODEL
from nanowaltz.models import load_agents_or_fresh  # noqa: E402
from rollout import (FEEDBACK_PREFILL, RolloutConfig, Trajectory, chat_ids, conversation_messages,  # noqa: E402
                     rollout, run_agent)


def warn_if_busy(busy_cores=None):
    """With other processes busy, OpenMP threads wait for each other: say so before measuring. Measured now over 0.5 s
    (cpu_threads.busy_cores_elsewhere), not from the load average, which lags by minutes after a job ends."""
    busy = cpu_threads.busy_cores_elsewhere() if busy_cores is None else busy_cores
    if busy is not None and busy >= cpu_threads.BUSY_CORES:
        print(f"note: other processes keep {busy:.2f} of {os.cpu_count()} cores busy: times will be noisy and with "
              f">1 thread can be several times slower (try --threads 1). Ratios are still measured back-to-back.")


def mixed_prompts(records, n):
    """n prompts taken round-robin over categories, so every batch mixes harmful, benign-sensitive and everyday."""
    by_category = {}
    for r in records:
        by_category.setdefault(r["category"], []).append(r)
    queues = [list(rows) for _, rows in sorted(by_category.items())]
    chosen = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    if len(chosen) < n:
        raise SystemExit(f"--batches asks for {n} prompts but the eval split has only {len(chosen)}")
    return chosen


def turn_tokens(trajectories) -> dict:
    """Generated tokens per kind of turn, counted from the Turn records."""
    return {"c0": sum(len(t.answers[0].action_ids) for t in trajectories),
            "feedback": sum(len(f.action_ids) for t in trajectories for f in t.feedbacks),
            "revision": sum(len(a.action_ids) for t in trajectories for a in t.answers[1:])}


def bench_throughput(model, tokenizer, prompts, batch, max_new_tokens, feedback_max_new_tokens, repeats, seed) -> dict:
    """Per repeat: the conversation agent alone, the two-agent rollout, the rollout without the shared-prefix cache
    and without drafts (order rotated), from the same seed on the same prompts; wall time and model forwards of each."""
    config = RolloutConfig(conversation_max_new_tokens=max_new_tokens, feedback_max_new_tokens=feedback_max_new_tokens,
                           batch_size=batch)
    chosen = prompts[:batch]
    contexts = [chat_ids(tokenizer, conversation_messages(Trajectory(prompt=p))) for p in chosen]
    forwards = []  # one entry per model call (prefills, decoding steps, system prompts)
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    runs = []
    for r in range(repeats):
        run = {}

        def single():
            torch.manual_seed(seed + r)
            forwards.clear()
            began = time.perf_counter()
            answers = run_agent(model, tokenizer, "conversation", contexts, max_new_tokens,
                                config.conversation_temperature, config)
            run["single_s"] = time.perf_counter() - began
            run["single_forwards"] = len(forwards)
            run["single_tokens"] = sum(len(a.action_ids) for a in answers)
            run["actions"] = [a.action_ids for a in answers]

        def two_agent(key="two", **changes):
            torch.manual_seed(seed + r)
            forwards.clear()
            began = time.perf_counter()
            trajectories = rollout(model, tokenizer, chosen, replace(config, **changes))
            run[f"{key}_s"] = time.perf_counter() - began
            run[f"{key}_forwards"] = len(forwards)
            run[f"{key}_turns"] = [[t.action_ids for t in tr.answers + tr.feedbacks] for tr in trajectories]
            run[f"{key}_tokens"] = turn_tokens(trajectories)
            if key == "two":
                run["revised"] = sum(t.revised for t in trajectories)
                run["c0"] = [t.answers[0].action_ids for t in trajectories]

        arms = [single, two_agent, lambda: two_agent("nocache", share_prefix=False),
                lambda: two_agent("nodraft", draft_feedback_keys=False)]
        for arm in arms[r % 4:] + arms[:r % 4]:
            arm()
        run["same_c0"] = sum(a == b for a, b in zip(run.pop("actions"), run.pop("c0")))
        run["same_nocache"] = sum(a == b for a, b in zip(run.pop("two_turns"), run.pop("nocache_turns")))
        runs.append(run)
    hook.remove()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    two_tok = [sum(x["two_tokens"].values()) for x in runs]
    return {
        "batch": batch,
        "single_tps": med([x["single_tokens"] / x["single_s"] for x in runs]),
        "two_tps": med([t / x["two_s"] for t, x in zip(two_tok, runs)]),
        "nocache_tps": med([t / x["nocache_s"] for t, x in zip(two_tok, runs)]),
        "tps_ratio": med([(t / x["two_s"]) / (x["single_tokens"] / x["single_s"]) for t, x in zip(two_tok, runs)]),
        "time_ratio": med([x["two_s"] / x["single_s"] for x in runs]),
        # The tok/s ratio if every forward cost the same whatever its rows and length: what the protocol's shape
        # allows (revisions at a fraction of the batch, forwards that only read), before any speed differences.
        "per_forward_ratio": med([(t / x["two_forwards"]) / (x["single_tokens"] / x["single_forwards"])
                                  for t, x in zip(two_tok, runs)]),
        "cache_speedup": med([x["nocache_s"] / x["two_s"] for x in runs]),
        # Without drafts other tokens are sampled (see the module docstring): compare tokens/s, not seconds.
        "nodraft_tps_ratio": med([(sum(x["nodraft_tokens"].values()) / x["nodraft_s"]) / (x["single_tokens"] /
                                 x["single_s"]) for x in runs]),
        "draft_speedup": med([(t / x["two_s"]) / (sum(x["nodraft_tokens"].values()) / x["nodraft_s"])
                              for t, x in zip(two_tok, runs)]),
        "tokens": {k: med([x["two_tokens"][k] for x in runs]) for k in ("c0", "feedback", "revision")},
        "ftr": med([x["revised"] / batch for x in runs]),
        "same_c0": min(x["same_c0"] for x in runs),
        "same_nocache": min(x["same_nocache"] for x in runs),
    }


def ok_label_tokens(tokenizer) -> int:
    """Decoding steps an "ok" feedback agent needs before early stop: ' false, "overrefuse": false' in tokens."""
    ids = tokenizer(' false, "overrefuse": false, "reasoning": ""}', add_special_tokens=False)["input_ids"]
    for k in range(1, len(ids) + 1):
        if labels_prefix_complete(FEEDBACK_PREFILL + tokenizer.decode(ids[:k], skip_special_tokens=True)):
            return k
    raise RuntimeError("labels_prefix_complete never saw the two labels in the canonical 'ok' output")


def latency_arms(ok_tokens, feedback_max_new_tokens) -> dict:
    """Arm name -> RolloutConfig overrides (greedy, batch 1 are added by bench_latency)."""
    return {
        "alone": {"max_rounds": 0},
        "fb+early": {"max_rounds": 1, "early_stop_ok": True, "feedback_max_new_tokens": feedback_max_new_tokens},
        "fb+early/nodraft": {"max_rounds": 1, "early_stop_ok": True, "feedback_max_new_tokens": feedback_max_new_tokens,
                             "draft_feedback_keys": False},
        "fb+full": {"max_rounds": 1, "early_stop_ok": False, "feedback_max_new_tokens": feedback_max_new_tokens},
        # What a feedback agent that approves the answer costs: read (prefill) everything, write the two labels,
        # early-stop. Emulated by cutting decoding at exactly that many tokens; a cut-off output never parses as a
        # flag, so no revision follows. This is the floor the early stop can reach, whatever the agent says.
        "fb+ok-floor": {"max_rounds": 1, "early_stop_ok": True, "feedback_max_new_tokens": ok_tokens},
        # The same two deployments with every system prompt recomputed for every prompt (no prefix cache).
        "alone/nocache": {"max_rounds": 0, "share_prefix": False},
        "fb+ok-floor/nocache": {"max_rounds": 1, "early_stop_ok": True, "feedback_max_new_tokens": ok_tokens,
                                "share_prefix": False},
    }


def baseline_arm(arm: str) -> str:
    """The arm an arm's overhead is measured against: the conversation agent alone, with the same prefix caching."""
    return "alone/nocache" if arm.endswith("/nocache") else "alone"


def bench_latency(model, tokenizer, prompts, max_new_tokens, repeats, arms_config) -> dict:
    """Per-prompt latency of each arm (median over repeats), the arms interleaved so load drift hits all alike. One
    prefix cache serves the whole run, as in infer.py; it is filled before the first timed call."""
    prefix_cache = {}
    rollout(model, tokenizer, prompts[:1], RolloutConfig(conversation_max_new_tokens=1, feedback_max_new_tokens=1,
                                                         batch_size=1), prefix_cache)
    per_arm = {arm: [] for arm in arms_config}
    detail = {arm: {"feedback_tokens": [], "revised": [], "feedback_s": [], "revision_s": [], "c0": [], "answer_s": [],
                    "verdict": [], "feedback_context": [], "conversation_context": []} for arm in arms_config}
    names = list(arms_config)
    for i, prompt in enumerate(prompts):
        seconds = {arm: [] for arm in arms_config}
        generated = {}  # greedy: every repeat generates the same tokens, so keep the first repeat's trajectory
        for r in range(repeats):
            shift = (i + r) % len(names)  # rotate the order over prompts and repeats
            for arm in names[shift:] + names[:shift]:
                config = RolloutConfig(conversation_max_new_tokens=max_new_tokens, conversation_temperature=0.0,
                                       feedback_temperature=0.0, batch_size=1, **arms_config[arm])
                began = time.perf_counter()
                (traj,) = rollout(model, tokenizer, [prompt], config, prefix_cache)
                seconds[arm].append(time.perf_counter() - began)
                generated.setdefault(arm, traj)
        for arm, traj in generated.items():
            per_arm[arm].append(statistics.median(seconds[arm]))
            d = detail[arm]
            d["c0"].append(traj.answers[0].action_ids)
            d["feedback_tokens"].append(sum(len(f.action_ids) for f in traj.feedbacks))
            d["revised"].append(traj.revised)
            d["feedback_s"].append(sum(f.seconds for f in traj.feedbacks))
            d["revision_s"].append(sum(a.seconds for a in traj.answers[1:]))
            d["answer_s"].append(traj.answers[0].seconds)
            d["conversation_context"].append(len(traj.answers[0].context_ids))
            if traj.feedbacks:
                parsed = traj.parsed[0]
                d["verdict"].append("unparseable" if parsed is None else "ok" if parsed.labels.ok else "flagged")
                d["feedback_context"].append(len(traj.feedbacks[0].context_ids))
    return {"per_arm": per_arm, "detail": detail}


def print_throughput(results, max_new_tokens, feedback_max_new_tokens):
    print(f"\n## Throughput: two-agent rollout vs conversation agent alone, prefix cache and drafts on and off "
          f"(conversation max_new_tokens={max_new_tokens}, feedback max_new_tokens={feedback_max_new_tokens}, "
          f"temperature 1, same seed)")
    head = (f"{'batch':>5} | {'single tok/s':>12} | {'two-agent tok/s':>15} | {'tok/s ratio':>11} | "
            f"{'time ratio':>10} | {'no-cache tok/s':>14} | {'cache speedup':>13} | {'tokens c0/fb/rev':>17} | "
            f"{'FTR':>5} | {'same c0':>7} | {'same no-cache':>13} | {'no-draft ratio':>14} | {'draft speedup':>13} | "
            f"{'per-forward ratio':>17}")
    print(head + "\n" + "-" * len(head))
    for x in results:
        t = x["tokens"]
        print(f"{x['batch']:>5} | {x['single_tps']:>12.1f} | {x['two_tps']:>15.1f} | {x['tps_ratio']:>11.2f} | "
              f"{x['time_ratio']:>10.2f} | {x['nocache_tps']:>14.1f} | {x['cache_speedup']:>13.2f} | "
              f"{t['c0']:>5.0f}/{t['feedback']:>5.0f}/{t['revision']:>5.0f} | {x['ftr']:>5.2f} | "
              f"{x['same_c0']:>3}/{x['batch']:<3} | {x['same_nocache']:>6}/{x['batch']:<6} | "
              f"{x['nodraft_tps_ratio']:>14.2f} | {x['draft_speedup']:>13.2f} | {x['per_forward_ratio']:>17.2f}")
    print("tok/s ratio = two-agent tokens/s / single-agent tokens/s (target >= 0.9 at batch 8 and 32); time ratio = "
          "two-agent wall time / single-agent wall time (the cost of adding feedback + revisions); cache speedup = "
          "rollout wall time without the shared-prefix cache / with it; medians over repeats. same c0 = rollout "
          "answers c_0 identical to the single-agent answers; same no-cache = trajectories whose every turn has the "
          "same tokens with and without the cache (worst repeat; both should be the whole batch); no-draft ratio = the "
          "tok/s ratio with the feedback JSON's keys not drafted; draft speedup = two-agent tok/s with drafts / "
          "without; per-forward ratio = (two-agent tokens per model forward) / (single-agent tokens per forward): "
          "the tok/s ratio if every forward cost the same, i.e. the bound the rollout's shape sets (revisions decode "
          "at a fraction of the batch; the feedback turn's prefill reads without generating).")


def print_latency(result, max_new_tokens, feedback_max_new_tokens, ok_tokens, target=0.15):
    per_arm, detail = result["per_arm"], result["detail"]
    n = len(per_arm["alone"])
    base = statistics.median(per_arm["alone"])
    print(f"\n## Latency on everyday prompts: {n} prompts, batch 1, greedy, conversation max_new_tokens="
          f"{max_new_tokens}, feedback max_new_tokens={feedback_max_new_tokens} ({ok_tokens} for fb+ok-floor)")
    head = (f"{'arm':>19} | {'median s':>8} | {'ratio':>5} | {'overhead':>8} | {'per-prompt ratio':>16} | "
            f"{'within-run':>10} | {'fb tokens':>9} | {'fb s':>5} | {'FTR':>4} | {'revision s':>10}")
    print(head + "\n" + "-" * len(head))
    verdicts, within = {}, {}
    for arm, secs in per_arm.items():
        d = detail[arm]
        baseline = per_arm[baseline_arm(arm)]
        ratio = statistics.median(secs) / statistics.median(baseline)
        per_prompt = statistics.median([s / b for s, b in zip(secs, baseline)])
        verdicts[arm] = ratio - 1.0
        within[arm] = statistics.median([(f + r) / a for f, r, a in zip(d["feedback_s"], d["revision_s"],
                                                                         d["answer_s"])])
        print(f"{arm:>19} | {statistics.median(secs):>8.2f} | {ratio:>5.2f} | {100 * (ratio - 1):>7.1f}% | "
              f"{per_prompt:>16.2f} | {100 * within[arm]:>9.1f}% | {statistics.mean(d['feedback_tokens']):>9.1f} | "
              f"{statistics.mean(d['feedback_s']):>5.2f} | {statistics.mean(d['revised']):>4.2f} | "
              f"{statistics.mean(d['revision_s']):>10.2f}")
    c0_tokens = statistics.mean(len(c) for c in detail["alone"]["c0"])
    same = sum(len({tuple(c) for c in cs}) == 1 for cs in zip(*(detail[arm]["c0"] for arm in per_arm)))
    print(f"ratio = median latency / median latency of 'alone' ('alone/nocache' for the /nocache arm); per-prompt "
          f"ratio = median over prompts of each "
          f"prompt's ratio; within-run = median over prompts of (feedback turn + revision s) / c_0 s inside the same "
          f"call; fb tokens, fb s, FTR and revision s are means per prompt (fb s / revision s: wall time of "
          f"the feedback turn / of the revision). c_0: {c0_tokens:.1f} tokens on average, identical in all arms for "
          f"{same}/{n} prompts.")
    d = detail["fb+early"]
    print(f"Context lengths: the conversation agent reads {statistics.mean(d['conversation_context']):.0f} tokens, "
          f"the feedback agent {statistics.mean(d['feedback_context']):.0f} (its system prompt + request + answer).")
    for arm in ("fb+early", "fb+early/nodraft", "fb+full", "fb+ok-floor", "fb+ok-floor/nocache"):
        overhead = verdicts[arm]
        met = "MET" if max(overhead, within[arm]) <= target else "NOT MET"
        d, baseline = detail[arm], baseline_arm(arm)
        fb_share = statistics.mean(d["feedback_s"]) / statistics.median(per_arm[baseline])
        rev_share = statistics.mean(d["revision_s"]) / statistics.median(per_arm[baseline])
        counts = ", ".join(f"{d['verdict'].count(v)} {v}" for v in ("ok", "flagged", "unparseable"))
        print(f"target overhead <= {100 * target:.0f}% with {arm}: {met} (end to end {100 * overhead:.1f}%, within "
              f"the run {100 * within[arm]:.1f}%). The feedback turn adds {100 * fb_share:.1f}% of the median "
              f"'{baseline}' latency (decoding {statistics.mean(d['feedback_tokens']):.1f} tokens on average), "
              f"revisions {100 * rev_share:.1f}% "
              f"(FTR {statistics.mean(d['revised']):.2f}); feedback verdicts: {counts}.")
    print("Early stop can only fire when the feedback agent writes both labels false ('ok'); fb+ok-floor is that best "
          "case, so its overhead is the floor of the protocol (reading the answer), not a measured agent behaviour. "
          "With drafts, an agent that writes exactly the approving text needs one forward for its whole turn; "
          "fb+ok-floor cuts whatever the agent writes after as many tokens, so an agent that writes other tokens "
          "(the untrained one) takes more forwards there than an approving one would.")


def integers(parser, flag, text) -> list:
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="What generation costs: a decoding step vs a bare forward by batch size, tokens/s of the "
                    "two-agent WaltzRL rollout vs the conversation agent alone with the shared-prefix cache on and "
                    "off, and the feedback agent's latency overhead on everyday prompts. Ratios are measured "
                    "back-to-back in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--step-batches", default="1,4,16,64",
                        help="comma-separated batch sizes for the step part")
    parser.add_argument("--step-steps", type=int, default=8, help="step part: timed decoding steps per measurement")
    parser.add_argument("--batches", default="1,8",
                        help="comma-separated batch sizes (prompts generated together) for the throughput part")
    parser.add_argument("--repeats", type=int, default=2,
                        help="throughput: repeats per batch size (sampled, a new seed each); medians are reported")
    parser.add_argument("--latency-repeats", type=int, default=1,
                        help="latency: timed runs per prompt and arm (greedy, so the tokens are the same every time; "
                             "the median over prompts is the main defence against noise)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="conversation agent's token limit (c_0 and revisions) in every arm")
    parser.add_argument("--feedback-max-new-tokens", type=int, default=RolloutConfig.feedback_max_new_tokens,
                        help="feedback agent's token limit (RolloutConfig's default)")
    parser.add_argument("--n-prompts", type=int, default=3,
                        help="everyday eval prompts in the latency part (there are 25)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the whole run; None = torch's default")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    parser.add_argument("--prompts", default=os.path.join(REPO, "data", "prompts.jsonl"),
                        help="prompt file (data.py JSONL format); its eval split is used")
    parser.add_argument("--parts", default="step,throughput,latency",
                        help="which parts to run, comma-separated: step, throughput, latency")
    parser.add_argument("--seed", type=int, default=0, help="base random seed of the sampled throughput runs")
    parser.add_argument("--adapters", default=None,
                        help="trained adapters (train.py output, e.g. runs/waltzrl/adapters); default: untrained agents")
    args = parser.parse_args(argv)

    batches, step_batches = (integers(parser, flag, getattr(args, flag[2:].replace("-", "_")))
                             for flag in ("--batches", "--step-batches"))
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"step", "throughput", "latency"}:
        parser.error(f"--parts: expected some of 'step', 'throughput', 'latency', got {args.parts!r}")
    if min(args.repeats, args.latency_repeats, args.max_new_tokens, args.feedback_max_new_tokens,
           args.n_prompts) < 1 or args.step_steps < 2:
        parser.error("--repeats, --latency-repeats, --max-new-tokens, --feedback-max-new-tokens and --n-prompts must "
                     "be positive, --step-steps >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_info())
    warn_if_busy()
    began = time.perf_counter()
    model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
    model.eval()
    print(f"model: {args.model} loaded in {time.perf_counter() - began:.1f}s")
    records = load_prompts(args.prompts, split="eval")
    # Warm-up: the first forward passes pay one-time costs (oneDNN kernel selection, allocator growth).
    warm = mixed_prompts(records, 2)
    rollout(model, tokenizer, warm, RolloutConfig(conversation_max_new_tokens=4, feedback_max_new_tokens=4))

    if "step" in parts:
        t0 = time.perf_counter()
        steps = bench_steps(model, tokenizer, step_batches, args.step_steps)
        print(f"  step: done in {time.perf_counter() - t0:.0f}s", flush=True)
        print_steps(steps, len(feedback_context(tokenizer)), args.step_steps)

    if "throughput" in parts:
        prompts = mixed_prompts(records, max(batches))
        results = []
        for batch in batches:
            t0 = time.perf_counter()
            results.append(bench_throughput(model, tokenizer, prompts, batch, args.max_new_tokens,
                                            args.feedback_max_new_tokens, args.repeats, args.seed))
            print(f"  batch {batch}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        print_throughput(results, args.max_new_tokens, args.feedback_max_new_tokens)

    if "latency" in parts:
        everyday = [r for r in records if r["category"] == "everyday"][:args.n_prompts]
        if not everyday:
            raise SystemExit(f"{args.prompts}: no 'everyday' prompts in the eval split")
        t0 = time.perf_counter()
        ok_tokens = ok_label_tokens(tokenizer)
        arms = latency_arms(ok_tokens, args.feedback_max_new_tokens)
        result = bench_latency(model, tokenizer, everyday, args.max_new_tokens, args.latency_repeats, arms)
        print(f"  latency: done in {time.perf_counter() - t0:.0f}s", flush=True)
        print_latency(result, args.max_new_tokens, args.feedback_max_new_tokens, ok_tokens)
    print(f"\ntotal {time.perf_counter() - began:.0f}s; {machine_info()}")


if __name__ == "__main__":
    main()

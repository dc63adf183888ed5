"""Benchmark: the update of one stage-2 iteration, micro-batches grouped by length against plain ones.

The update (train.update_agents: advantages, reference log-probs, then PPO steps for both agents) is a forward and a
backward over every sample's whole context, and on a CPU it is bound by arithmetic: every position the decoder runs
costs the same, padding included. A padded micro-batch runs every row to its longest row's length, and the
conversation agent's samples mix answers (~80 tokens after the system prompt) with revisions that also read the first
answer and the feedback (~180): about half of what the plain micro-batches ran was padding. `logprobs.micro_batches`
sorts the samples by length and cuts them where a cut saves more padding than the extra run of the shared system
prompt costs; gradient accumulation makes the result the same (tests/test_train.py).

How: one rollout of a `--preset cpu` iteration (8 prompts x 4 samples, both agents, stage-2 rewards) from the given
adapters, judged once; then the same samples are updated twice from the same adapter state with fresh optimizers,
once with the micro-batches of the sample order (`plain`, the earlier code) and once grouped by length, --repeats
times in alternation. It prints, per arm, the median update seconds, the positions the decoder ran and how many of
them were padding, the ratio grouped/plain, how far the two updates' parameter changes differ, the grouped update's
arithmetic against this CPU's matmul rate measured in the same run (how near the update is to its bound), and the
whole iteration (rollout + judge + grouped update) per trajectory. That last number is for this machine only: the
old code against the new on one machine is in docs/performance.md ("Same machine, same settings").

    HF_HUB_OFFLINE=1 python bench/update.py --adapters runs/<preset run>/adapters     # a few minutes on 2 idle cores
    HF_HUB_OFFLINE=1 python bench/update.py --model <path> --prompts 2 --samples 2 --judge default:phrase  (smoke)

With --adapters of a `--preset cpu` run, its warm-started feedback adapter (<run>/warmstart) is the feedback agent's
reference, as in training; without --adapters both agents start fresh (the untrained agents write longer turns).
Run it on an otherwise quiet machine.
"""
import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanowaltz import cpu_threads  # noqa: E402,F401  (before torch: OpenMP reads its settings when torch loads)
import torch  # noqa: E402


def plain_micro_batches(samples, max_rows, share_prefix):
    """The earlier code: runs of max_rows in the order the samples come (a shuffled minibatch)."""
    return [samples[i:i + max_rows] for i in range(0, len(samples), max_rows)]


def count_positions(train, counts):
    """Wrap train.action_logprobs to count the positions each forward runs (prefix once + rows x width), the padding,
    and the positions of forwards that also run a backward (the PPO steps; the reference pass runs without grad)."""
    real_action_logprobs = train.action_logprobs

    def counted(model, batch, *args, **kwargs):
        rows, width = batch.input_ids.shape
        positions = batch.prefix_ids.numel() + rows * width
        counts["positions"] += positions
        counts["with_backward"] += positions if torch.is_grad_enabled() else 0
        counts["padding"] += rows * width - (int(batch.attention_mask.sum()) - rows * batch.prefix_ids.numel())
        return real_action_logprobs(model, batch, *args, **kwargs)
    return real_action_logprobs, counted


def decoder_linear_params(base) -> int:
    """Weights of the decoder's linear layers (lm_head excluded: the fused kernel runs it only on action tokens)."""
    head = base.get_output_embeddings()
    return sum(m.in_features * m.out_features for m in base.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def update_flops(linear_params: int, positions: int, with_backward: int) -> int:
    """The decoder's linear-layer arithmetic of an update: 2 FLOPs per weight per position forward, and 2 more for the
    positions that run backward, whose frozen base weights need only the input gradient (LoRA's own is ~1% more).
    Attention scores and lm_head are left out, so this is a floor on the work done."""
    return 2 * linear_params * (positions + with_backward)


def matmul_gflops(rows: int, hidden: int, intermediate: int, repeats: int = 10) -> float:
    """This CPU's fp32 matmul rate on one of the decoder's own shapes (the MLP's up projection over many positions),
    measured now: the arithmetic ceiling of the update."""
    x, w = torch.randn(rows, hidden), torch.randn(intermediate, hidden)
    for _ in range(3):
        x @ w.T
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - began)
    return 2 * rows * hidden * intermediate / statistics.median(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Seconds of one stage-2 update (--preset cpu sizes) with length-grouped micro-batches against "
                    "plain ones, on the same samples from the same adapter state.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapters", default=None,
                        help="a trained pair (e.g. runs/<run>/adapters); default: fresh, untrained adapters")
    parser.add_argument("--model", default="default",
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the iteration (--preset cpu: 8)")
    parser.add_argument("--samples", type=int, default=4, help="trajectories per prompt (--preset cpu: 4)")
    parser.add_argument("--repeats", type=int, default=1, help="updates per arm (medians are reported)")
    parser.add_argument("--judge", default="default", help="judge spec (judge.py), e.g. 'default' or 'default:phrase'")
    parser.add_argument("--seed", type=int, default=0, help="prompt choice, sampling and minibatch order")
    args = parser.parse_args(argv)
    if min(args.prompts, args.samples, args.repeats) < 1:
        parser.error("--prompts, --samples and --repeats must be >= 1")
    if args.adapters and not Path(args.adapters).is_dir():
        parser.error(f"--adapters {args.adapters}: no such folder")

    began_all = time.perf_counter()
    import train
    from nanowaltz.judge import judge_from_flag
    from nanowaltz.base_model import load_base
    from nanowaltz.models import attach_agents, load_agents, load_reference_copy
    from reward import trajectory_rewards
    from nanowaltz.base_model import context_window
    from nanowaltz.training_run import load_training_prompts, make_optimizers
    from rollout import judge_trajectories, rollout

    train_args = train.Args(preset="cpu", model=args.model, seed=args.seed, judge=args.judge,
                            prompts_per_iteration=args.prompts, samples_per_prompt=args.samples)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base(args.model)
    linear_params = decoder_linear_params(base)  # before the adapters wrap the layers
    train_args.recompute_old_logprobs = base.dtype != torch.float32  # as train.py decides it (no 4-bit on a CPU)
    if args.adapters:
        model = load_agents(base, args.adapters, trainable=True)
        warm = Path(args.adapters).parent / "warmstart"
        if (warm / "feedback").is_dir():
            load_reference_copy(model, "feedback", warm)
    else:
        model = attach_agents(base, rank=train_args.lora_rank, alpha=train_args.lora_alpha)
    judge = judge_from_flag(args.judge)
    rng = random.Random(args.seed)
    config = train.rollout_config_of(train_args)
    prompts = train.fitting_prompts(load_training_prompts(train_args), tokenizer, context_window(base), config,
                                    train_args)
    prompts = [p for p in rng.sample(prompts, min(args.prompts, len(prompts))) for _ in range(args.samples)]

    began = time.perf_counter()
    trajectories = rollout(model, tokenizer, prompts, config)
    rollout_s = time.perf_counter() - began
    began = time.perf_counter()
    judge_trajectories(judge, trajectories)
    judge_s = time.perf_counter() - began
    rewards = [trajectory_rewards(t, train_args.alpha, train_args.stage2_lam, train_args.gamma) for t in trajectories]
    samples = train.make_samples(trajectories, rewards, rng)
    print(f"rollout {rollout_s:.1f} s, judge {judge_s:.1f} s: {len(trajectories)} trajectories, "
          f"{sum(t.revised for t in trajectories)} revised, {len(samples)} samples", flush=True)

    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    arms = {"plain": plain_micro_batches, "grouped": train.micro_batches}
    seconds, counts, moved = {arm: [] for arm in arms}, {}, {}
    real_micro_batches = train.micro_batches
    try:
        for repeat in range(args.repeats):
            for arm, split in arms.items():
                with torch.no_grad():  # the same adapter state, fresh optimizers, the same minibatch order
                    for n, p in model.named_parameters():
                        if n in start:
                            p.copy_(start[n])
                run = SimpleNamespace(model=model, tokenizer=tokenizer, device=next(model.parameters()).device,
                                      optimizers=make_optimizers(model, train_args))
                counts[arm] = {"positions": 0, "with_backward": 0, "padding": 0}
                real_action_logprobs, train.action_logprobs = count_positions(train, counts[arm])
                train.micro_batches = split
                try:
                    began = time.perf_counter()
                    train.update_agents(run, train_args, copy.deepcopy(samples), ("feedback", "conversation"),
                                        random.Random(args.seed))
                    seconds[arm].append(time.perf_counter() - began)
                finally:
                    train.action_logprobs, train.micro_batches = real_action_logprobs, real_micro_batches
                moved[arm] = {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}
                print(f"  {arm}: update {seconds[arm][-1]:.1f} s", flush=True)
    finally:
        train.micro_batches = real_micro_batches

    # Norm-wise: Adam's first step is ~lr x g / |g|, so single elements with |g| near its eps amplify float rounding.
    change = torch.cat([d.flatten() for d in moved["plain"].values()])
    differ = torch.cat([(moved["plain"][n] - moved["grouped"][n]).flatten() for n in moved["plain"]])
    median = {arm: statistics.median(s) for arm, s in seconds.items()}
    print(f"\n{'micro-batches':>14} | {'update s':>8} | {'positions run':>13} | {'padding':>7}")
    for arm in arms:
        c = counts[arm]
        print(f"{arm:>14} | {median[arm]:>8.1f} | {c['positions']:>13} | {c['padding'] / c['positions']:>6.0%}")
    # With fresh adapters many LoRA-A gradients start near Adam's eps, where rounding moves the step a lot: the two
    # arms then differ by much more than with a trained pair (docs/performance.md; with SGD they agree to ~1e-5).
    difference = (f"differ by {differ.norm() / change.norm():.1e} of their norm" if change.norm() > 0
                  else "are both zero (were all advantages zero?)")
    print(f"grouped / plain: {median['grouped'] / median['plain']:.2f} in time, "
          f"{counts['grouped']['positions'] / counts['plain']['positions']:.2f} in positions run; the two updates' "
          f"parameter changes {difference}")
    flops = update_flops(linear_params, counts["grouped"]["positions"], counts["grouped"]["with_backward"])
    peak = matmul_gflops(2048, base.config.hidden_size, base.config.intermediate_size)
    achieved = flops / median["grouped"] / 1e9
    print(f"grouped update: at least {flops / 1e12:.2f} TFLOP in the decoder's linears ({linear_params:,} "
          f"weights; {counts['grouped']['with_backward']} of the positions also backward) = {achieved:.0f} GFLOPS, "
          f"{achieved / peak:.2f} of this CPU's fp32 matmul rate measured now ({peak:.0f} GFLOPS)")
    per_trajectory = (rollout_s + judge_s + median["grouped"]) / len(trajectories)
    print(f"stage-2 iteration: {rollout_s + judge_s + median['grouped']:.1f} s = {per_trajectory:.2f} s per "
          f"trajectory. Total {time.perf_counter() - began_all:.0f} s.")


if __name__ == "__main__":
    main()

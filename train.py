"""WaltzRL training: a hand-written PPO-style joint update of the conversation agent and the feedback agent.

One iteration is (docs/method.md "Training"; arXiv 2510.08240 Sec. 3.3); the numbered sections below are these steps,
and `train()` at the end runs all six in order:

    1. rollout     two-agent trajectories for a batch of training prompts                 (rollout.py)
    2. judge       labels (unsafe, overrefuse) for every answer                           (judge.py)
    3. rewards     R_c for answers; R_f = alpha*R_dir*R_label + lam*R_label + gamma*R_format   (reward.py)
    4. samples     trajectories -> single-agent samples: every feedback turn (p, c_t) -> f_t with R_f, and one
                   conversation sample per trajectory, type A (p -> c_0, R_c(c_0)) or type B
                   ((p, c_0, f_0) -> c_final, R_c(c_final)) chosen at random (type A when nothing was revised)
    5. advantages  per agent, REINFORCE++ style: one scalar reward per sample, optionally minus the mean of the
                   samples of the same prompt (group baseline), normalised over the agent's whole batch
    6. update      PPO clipped surrogate + KL to the reference policy, a few epochs of minibatches, one optimizer
                   per agent; stage 1 trains only the feedback agent (lam > 0), stage 2 both (lam = 0)

Before step 1, `--warmstart-epochs N` (on in `--preset cpu` only) runs a supervised warm-start of the feedback agent
(warmstart.py): OUR DEPARTURE, for a base model too small to write sensible feedback untrained. Checkpoints, and the
exact resume after Ctrl-C, SIGTERM or a crash, are checkpoint.py's. The settings (`Args`, one field per flag) are in
config.py; setting a run up (prompts, judge, model, optimizers, output folder), its log and summary in training_run.py.

`torchrun --nproc-per-node N train.py ...` trains data-parallel on N GPUs: the global batch and optimizer steps of one
process, the work split over the ranks (distributed.py). The few lines that take part are marked `# distributed:`
(here and in training_run.py); they do nothing in a plain `python train.py` run.

What we simplify or choose (the paper publishes no code or hyperparameters):
- LoRA adapters on one shared base model instead of full fine-tuning of two models (models.py).
- KL is a loss term (the k3 estimator of Schulman, "Approximating KL Divergence", 2020, as in GRPO), not a
  per-token penalty folded into the reward as in REINFORCE++ (Hu, 2025). Both pull each agent toward pi_ref; with
  the KL outside the reward every token of a sample shares one advantage, which keeps the advantage normalisation
  "over the whole batch" exactly what it says, and the KL strength stays independent of reward scale.
- Losses average over all action tokens of a minibatch (token-mean), as in DAPO / OpenRLHF's default.
- Old-policy log-probs in fp32 (a CPU run) are the log-probs recorded while sampling (sampler.py computes them from
  the same tempered distribution; they match a training forward to ~1e-5). That saves one forward pass per sample,
  a third of the update's cost on a CPU. In bf16 or on a 4-bit base (a GPU run) decoding one token at a time rounds
  differently from the training forward (up to 0.03 nats per token on the tiny test model), so there they are
  recomputed with a training forward by default (as OpenRLHF does) and the mismatch is logged;
  --recompute-old-logprobs / --no-recompute-old-logprobs force either choice.
- No value network, no GAE: REINFORCE++ is critic-free.
- Shared-prefix forward (engineering, same numbers): the system prompt common to a micro-batch runs once and its
  keys/values are repeated over the rows (action_logprobs); it is most of a feedback sample's tokens.
- Length-grouped micro-batches (engineering, same numbers): a minibatch is cut into micro-batches of similar length
  (logprobs.micro_batches), so a short answer is not padded to a long revision's length; the gradients are
  accumulated over the pieces, so the optimizer step is the one of the whole minibatch.
"""
import cpu_threads  # noqa: F401  (first: OpenMP reads its wait settings when torch loads)
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import distributed
from checkpoint import StopSignals, rng_state, save_checkpoint, stop_and_save
from config import Args, parse_args, share_prefix
from logprobs import action_logprobs, micro_batches, pad_batch
from models import AGENTS, adapter_parameters, reference_policy, save_agents, use_agent
from reward import trajectory_rewards
from rollout import judge_trajectories, rollout
from training_run import learning_curve_eval, print_summary, set_up_run, warm_start, write_log


# ---------------------------------------------------------------------------------------------------------------------
# 1. Rollout and 2. judge (rollout.py, judge.py); 3. the rewards are reward.trajectory_rewards, called in train()
# ---------------------------------------------------------------------------------------------------------------------
def collect_trajectories(run, args, iteration, rng) -> tuple:
    """Roll out --samples-per-prompt trajectories for each of --prompts-per-iteration random training prompts, and
    judge every answer. Returns (the judged trajectories of the whole batch, timing for the log)."""
    began = time.perf_counter()
    batch_prompts = rng.sample(run.prompts, min(args.prompts_per_iteration, len(run.prompts)))
    batch_prompts = [p for p in batch_prompts for _ in range(args.samples_per_prompt)]
    distributed.seed_sampling(args.seed, iteration)  # distributed: each rank its own sampling noise
    with distributed.stop_all_on_error("the rollout"):  # distributed: rolls out this rank's slice
        trajectories = rollout(run.model, run.tokenizer, distributed.share(batch_prompts), run.rollout_config)
    rollout_seconds = time.perf_counter() - began
    generated = sum(len(t.action_ids) for tr in trajectories for t in tr.answers + tr.feedbacks)

    began = time.perf_counter()
    with distributed.stop_all_on_error("judging"):  # distributed: judges this rank's slice
        judge_trajectories(run.judge, trajectories)
    trajectories = distributed.gather(trajectories)  # distributed: from here on, the whole batch on every rank
    return trajectories, {"tokens_per_s": generated / max(rollout_seconds, 1e-9), "time_rollout": rollout_seconds,
                          "time_judge": time.perf_counter() - began}


# ---------------------------------------------------------------------------------------------------------------------
# 4. Trajectories -> single-agent samples
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    agent: str  # which adapter this sample trains
    group: str  # prompt id: samples of one prompt share a group baseline
    context_ids: list  # exactly what the agent was conditioned on
    action_ids: list  # exactly what it sampled
    sampling_logprobs: list
    reward: float
    advantage: float = 0.0


def make_samples(trajectories, rewards, rng: random.Random) -> list:
    """Decompose trajectories into single-agent samples (docs/method.md "Training": type A and type B samples)."""
    samples = []
    for traj, rew in zip(trajectories, rewards):
        group = str(traj.prompt["id"])
        for turn, parts in zip(traj.feedbacks, rew["feedback"]):
            samples.append(Sample("feedback", group, turn.context_ids, turn.action_ids, turn.sampling_logprobs,
                                  parts.total))
        # One conversation sample per trajectory, type A or B at random: training on both would double-count
        # the prompt; the random choice lets the agent learn to answer well first AND to use feedback.
        use_revision = traj.revised and rng.random() < 0.5
        index = len(traj.answers) - 1 if use_revision else 0
        turn = traj.answers[index]
        samples.append(Sample("conversation", group, turn.context_ids, turn.action_ids, turn.sampling_logprobs,
                              rew["conversation"][index]))
    return [s for s in samples if s.action_ids]  # an empty action has no token to train


# ---------------------------------------------------------------------------------------------------------------------
# 5. Advantages (REINFORCE++: critic-free, normalised over the whole batch)
# ---------------------------------------------------------------------------------------------------------------------
def compute_advantages(samples, group_baseline: bool) -> None:
    """Set sample.advantage for one agent's samples: (r - group mean if asked), then (x - mean) / std over the batch."""
    if not samples:
        return
    values = [s.reward for s in samples]
    if group_baseline:  # GRPO-style baseline: compare each sample with the others drawn for the same prompt
        by_group = {}
        for s in samples:
            by_group.setdefault(s.group, []).append(s.reward)
        values = [s.reward - sum(by_group[s.group]) / len(by_group[s.group]) for s in samples]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    for s, v in zip(samples, values):
        s.advantage = (v - mean) / (std + 1e-6)  # all-equal rewards -> all-zero advantages: no signal, only KL


# ---------------------------------------------------------------------------------------------------------------------
# 6. The update: log-probs with the fused kernel, PPO clipped surrogate, KL to pi_ref
# ---------------------------------------------------------------------------------------------------------------------
def ppo_loss(logprobs, old_logprobs, ref_logprobs, advantages, clip_eps, kl_coef):
    """Per-token PPO clipped surrogate plus k3 KL to the reference; returns (sum over tokens, stats).

    All inputs are [num_tokens]; advantages are the per-sample advantage repeated over its tokens. The caller divides
    the sum by the minibatch's token count (token-mean).

    When the clip does anything. ratio = pi_theta / pi_old, and pi_old is the policy that sampled the iteration's
    rollouts. On an iteration's FIRST minibatch no optimizer step has happened yet, so pi_theta = pi_old and the ratio
    is 1 (up to sampling-vs-training numerics): nothing is clipped and the loss is the plain policy gradient
    (the gradient of ratio * A at ratio 1 is A * grad log pi). The clip only acts on later minibatches and later
    epochs, after earlier steps moved the policy. With the defaults (--ppo-epochs 1, --minibatch-size 8) an agent
    with at most 8 samples per iteration (the demo: 6 prompts) takes one on-policy REINFORCE-style step per
    iteration; the clip matters with more samples than one minibatch or with --ppo-epochs > 1.
    """
    # Clamp log-ratios so a single wild token cannot produce inf/NaN (exp(88) overflows fp32).
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    policy_loss = -torch.minimum(unclipped, clipped)  # PPO (Schulman et al. 2017), eq. 7
    # k3 estimator of KL(pi || pi_ref) = E_pi[r - 1 - log r] with r = pi_ref / pi: unbiased, always >= 0.
    ref_log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    kl = ref_log_ratio.exp() - 1.0 - ref_log_ratio
    loss = policy_loss + kl_coef * kl
    stats = {"kl": kl.detach().sum().item(), "clipped": ((unclipped - clipped).abs() > 1e-12).sum().item(),
             "policy_loss": policy_loss.detach().sum().item()}
    return loss.sum(), stats


@torch.no_grad()
def score_samples(model, samples, agent, args, pad_id, device):
    """Reference (and, if asked, old-policy) log-probs for every sample (no grad), stored on the samples as tensors."""
    mine = distributed.share(samples)  # distributed: each rank scores its slice, then the ranks swap scores
    for chunk in micro_batches(mine, args.micro_batch_size, share_prefix(args)):  # grouped by length
        batch = pad_batch(chunk, pad_id, device, share_prefix(args))
        if args.recompute_old_logprobs:
            use_agent(model, agent)
            old = action_logprobs(model, batch, args.temperature, args.logprob_chunk_size)
        else:
            old = torch.tensor([lp for s in chunk for lp in s.sampling_logprobs], device=device)
        with reference_policy(model, agent):
            ref = action_logprobs(model, batch, args.temperature, args.logprob_chunk_size)
        offset = 0
        for s in chunk:
            n = len(s.action_ids)
            s.old_logprobs, s.ref_logprobs = old[offset:offset + n].float(), ref[offset:offset + n].float()
            offset += n
    distributed.exchange_scores(samples)


def update_agent(model, optimizer, agent, samples, args, pad_id, device, rng) -> dict:
    """PPO epochs over one agent's samples; returns averaged statistics for the log."""
    use_agent(model, agent)
    params = adapter_parameters(model, agent)
    totals = {"kl": 0.0, "clipped": 0.0, "policy_loss": 0.0, "loss": 0.0, "entropy": 0.0, "tokens": 0,
              "grad_norm": 0.0, "steps": 0, "skipped_steps": 0}
    for _ in range(args.ppo_epochs):
        order = samples[:]
        rng.shuffle(order)
        for mb_start in range(0, len(order), args.minibatch_size):
            minibatch = order[mb_start:mb_start + args.minibatch_size]
            mb_tokens = sum(len(s.action_ids) for s in minibatch)
            optimizer.zero_grad(set_to_none=True)
            mb_loss, finite = 0.0, True
            mine = distributed.share(minibatch)  # distributed: this rank's slice; mb_tokens above stays global
            for micro in micro_batches(mine, args.micro_batch_size, share_prefix(args)):  # grouped by length
                batch = pad_batch(micro, pad_id, device, share_prefix(args))
                logprobs, entropy = action_logprobs(model, batch, args.temperature, args.logprob_chunk_size,
                                                    with_entropy=True)
                old = torch.cat([s.old_logprobs for s in micro]).to(device)
                ref = torch.cat([s.ref_logprobs for s in micro]).to(device)
                adv = torch.cat([torch.full((len(s.action_ids),), s.advantage, device=device) for s in micro])
                loss_sum, stats = ppo_loss(logprobs, old, ref, adv, args.clip_eps, args.kl_coef)
                loss = loss_sum / mb_tokens  # token-mean over the whole minibatch
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                mb_loss += loss.item()
                for key in ("kl", "clipped", "policy_loss"):
                    totals[key] += stats[key]
                totals["entropy"] += entropy.sum().item()
                totals["tokens"] += len(logprobs)
            finite, mb_loss = distributed.all_reduce_gradients(params, finite, mb_loss)  # distributed: sum over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if finite else None
            if not finite or not torch.isfinite(grad_norm):
                # A non-finite loss or gradient would poison Adam's moments for good: skip this step and say so.
                print(f"warning: non-finite loss/gradient for the {agent} agent; step skipped", file=sys.stderr)
                optimizer.zero_grad(set_to_none=True)
                totals["skipped_steps"] += 1
                continue
            optimizer.step()
            totals["loss"] += mb_loss
            totals["grad_norm"] += grad_norm.item()
            totals["steps"] += 1
    distributed.sum_over_ranks(totals, ("kl", "clipped", "policy_loss", "entropy", "tokens"))  # distributed: log
    tokens, steps = max(totals["tokens"], 1), max(totals["steps"], 1)
    return {"kl": totals["kl"] / tokens, "clip_frac": totals["clipped"] / tokens, "entropy": totals["entropy"] / tokens,
            "policy_loss": totals["policy_loss"] / tokens, "loss": totals["loss"] / steps,
            "grad_norm": totals["grad_norm"] / steps, "skipped_steps": totals["skipped_steps"],
            "samples": len(samples)}


def update_agents(run, args, samples, trained, rng) -> dict:
    """Steps 5 and 6 for each trained agent, one independent actor per agent; returns {agent: its log statistics}."""
    agent_stats = {}
    for agent in trained:
        agent_samples = [s for s in samples if s.agent == agent]
        if not agent_samples:
            continue
        compute_advantages(agent_samples, group_baseline=args.samples_per_prompt > 1)
        score_samples(run.model, agent_samples, agent, args, run.tokenizer.pad_token_id, run.device)
        agent_stats[agent] = update_agent(run.model, run.optimizers[agent], agent, agent_samples, args,
                                          run.tokenizer.pad_token_id, run.device, rng)
        if args.recompute_old_logprobs:  # how far sampling numerics are from the training forward
            gaps = [abs(a - b) for s in agent_samples for a, b in zip(s.sampling_logprobs, s.old_logprobs.tolist())]
            agent_stats[agent]["sampling_logprob_mismatch"] = max(gaps)
            agent_stats[agent]["sampling_logprob_mismatch_mean"] = sum(gaps) / len(gaps)
    return agent_stats


# ---------------------------------------------------------------------------------------------------------------------
# The log row of an iteration
# ---------------------------------------------------------------------------------------------------------------------
def batch_metrics(trajectories, rewards) -> dict:
    """What the iteration's rollouts say about the agents (before any update)."""
    feedback_parts = [p for r in rewards for p in r["feedback"]]
    harmful = [t for t in trajectories if t.prompt["label"] == "harmful"]
    benign = [t for t in trajectories if t.prompt["label"] != "harmful"]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "conversation_reward_before": mean([r["conversation"][0] for r in rewards]),
        "conversation_reward_after": mean([r["conversation"][-1] for r in rewards]),
        "feedback_reward": mean([p.total for p in feedback_parts]),
        "feedback_dir": mean([p.dir for p in feedback_parts]),
        "format_rate": mean([p.format for p in feedback_parts]),
        "label_accuracy": mean([p.label for p in feedback_parts]),
        "ftr": mean([float(t.revised) for t in trajectories]),
        "unsafe_rate_final": mean([float(t.judged[-1].unsafe) for t in harmful]),
        "overrefuse_rate_final": mean([float(t.judged[-1].overrefuse) for t in benign]),
    }


def iteration_record(run, args, iteration, stage, lam, trajectories, rewards, timing, agent_stats) -> dict:
    """The iteration's row of log.jsonl: batch rates before the update, timing, per-agent update statistics, and the
    learning-curve eval every --eval-every iterations (and after the last)."""
    record = {"iteration": iteration + 1, "stage": stage, "lam": lam, **batch_metrics(trajectories, rewards), **timing}
    for agent, stats in agent_stats.items():
        record.update({f"{agent}/{k}": v for k, v in stats.items()})
    total = run.stage1_iterations + args.stage2_iterations
    if args.eval_every > 0 and ((iteration + 1) % args.eval_every == 0 or iteration + 1 == total):
        record.update(learning_curve_eval(run, args))
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def train(args: Args, judge=None, prompts=None, eval_prompts=None) -> dict:
    """Run both stages; returns a summary. `judge`, `prompts` and `eval_prompts` (the periodic eval's prompts) may be
    passed in directly (tests, notebooks)."""
    from tqdm import tqdm

    args.validate()
    distributed.init(args.dist_timeout)  # distributed: joins the ranks under torchrun, else does nothing
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    run = set_up_run(args, rng, judge, prompts, eval_prompts)  # out folder, prompts, judge, model, optimizers, resume
    model, optimizers = run.model, run.optimizers
    if args.warmstart_epochs > 0 and not args.single_agent:
        warm_start(run, args, rng)  # 0. (departure) afterwards the feedback agent's KL anchor is the warm-started copy
    distributed.broadcast_adapters(model)  # distributed: every rank starts from rank 0's adapters
    if args.eval_every > 0 and not args.resume:  # the starting point of the learning curves
        # distributed: every rank runs the same greedy eval (identical results, ranks stay in step); rank 0 writes it
        write_log(run, {"iteration": 0, "stage": 0, **learning_curve_eval(run, args)})

    # A stop (Ctrl-C, SIGTERM) abandons an iteration that has not begun its update; once it has, the iteration is
    # finished first. Either way the checkpoint holds the state after the last completed iteration (checkpoint.py).
    total = run.stage1_iterations + args.stage2_iterations
    completed, boundary, saved = run.start, rng_state(rng), (run.start if args.resume else None)
    history = []
    bar = tqdm(range(run.start, total), initial=run.start, total=total, unit="it",
               desc="single-agent RL" if args.single_agent else "WaltzRL")
    stop = StopSignals().install()
    try:
        for iteration in bar:
            stage = 1 if iteration < run.stage1_iterations else 2
            trained = ("feedback",) if stage == 1 else ("conversation",) if args.single_agent else AGENTS
            # Stage 2 drops the additive label reward (the paper's lam = 0); the DIR gate stays. Then a correct "ok"
            # and a false alarm both earn only gamma: our 135M feedback agent drifts to flagging more (README
            # "Results"); --stage2-lam > 0 keeps paying for correct labels.
            lam = args.lam if stage == 1 else args.stage2_lam

            trajectories, timing = collect_trajectories(run, args, iteration, rng)  # 1. rollout, 2. judge
            rewards = [trajectory_rewards(t, args.alpha, lam, args.gamma) for t in trajectories]  # 3. rewards
            stop.hold()  # the adapters are about to change: a stop request now waits for the end of the iteration
            began = time.perf_counter()
            samples = make_samples(trajectories, rewards, rng)  # 4. samples
            agent_stats = update_agents(run, args, samples, trained, rng)  # 5. advantages, 6. update
            timing["time_update"] = time.perf_counter() - began

            record = iteration_record(run, args, iteration, stage, lam, trajectories, rewards, timing, agent_stats)
            write_log(run, record)
            history.append(record)
            completed, boundary = iteration + 1, rng_state(rng)
            shown = {} if args.single_agent else {"Rf": "feedback_reward", "fmt": "format_rate",
                                                  "acc": "label_accuracy", "ftr": "ftr"}
            bar.set_postfix(stage=stage, Rc=f"{record['conversation_reward_before']:.2f}->"
                            f"{record['conversation_reward_after']:.2f}",
                            **{name: f"{record[key]:.2f}" for name, key in shown.items()})
            if completed % args.save_every == 0:
                save_checkpoint(model, optimizers, completed, args, boundary, run.checkpoint)
                saved = completed
            stop.release()
            if stop.requested:  # asked during the update: the iteration is complete now
                raise KeyboardInterrupt
        bar.close()
        stop.hold()
        save_checkpoint(model, optimizers, total, args, rng_state(rng), run.checkpoint)
        if distributed.is_main():  # distributed: rank 0 writes the adapters
            save_agents(model, run.out / "adapters")
        distributed.barrier("the final save")  # distributed: no rank returns (and reads them) before they are written
        stop.release()
    except KeyboardInterrupt:
        bar.close()
        raise SystemExit(stop_and_save(stop, model, optimizers, completed, boundary, saved, args, run.checkpoint)) \
            from None
    except torch.OutOfMemoryError:
        bar.close()
        raise SystemExit("Out of memory. Lower, in this order: --micro-batch-size, --rollout-batch-size, "
                         "--conversation-max-new-tokens / --feedback-max-new-tokens, --prompts-per-iteration; "
                         "or turn on --gradient-checkpointing and --load-in-4bit yes.") from None
    finally:
        stop.restore()
    return {"history": history, "adapters": str(run.out / "adapters"), "log": str(run.log_path), "model": model,
            "single_agent": args.single_agent}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        summary = train(parse_args())
        if distributed.is_main():  # distributed: rank 0 prints
            print_summary(summary)
        distributed.finish()
    except KeyboardInterrupt:  # before the first iteration (loading, warm-start): there is nothing to save yet
        print("\nInterrupted before training began: nothing saved", file=sys.stderr)
        sys.exit(130)

"""WaltzRL training: a hand-written PPO-style joint update of the conversation agent and the feedback agent.

One iteration is (docs/method.md "Training"; arXiv 2510.08240 Sec. 3.3); the numbered sections below are steps 4-6,
and `train()` near the end runs all six in order:

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
exact resume after Ctrl-C, SIGTERM or a crash, are checkpoint.py's.

`torchrun --nproc-per-node N train.py ...` trains data-parallel on N GPUs: the global batch and optimizer steps of one
process, the work split over the ranks (distributed.py). The few lines that take part are marked `# distributed:`;
they do nothing in a plain `python train.py` run.

What we simplify or choose (the paper publishes no code or hyperparameters):
- LoRA adapters on one shared base model instead of full fine-tuning of two models (models.py).
- KL is a loss term (the k3 estimator of Schulman, "Approximating KL Divergence", 2020, as in GRPO), not a
  per-token penalty folded into the reward as in REINFORCE++ (Hu, 2025). Both pull each agent toward pi_ref; with
  the KL outside the reward every token of a sample shares one advantage, which keeps the advantage normalisation
  "over the whole batch" exactly what it says, and the KL strength stays independent of reward scale.
- Losses average over all action tokens of a minibatch (token-mean), as in DAPO / OpenRLHF's default.
- Old-policy log-probs in fp32 (a CPU run) are the log-probs recorded while sampling (rollout.py computes them from
  the same tempered distribution; they match a training forward to ~1e-5). That saves one forward pass per sample,
  a third of the update's cost on a CPU. In bf16 or on a 4-bit base (a GPU run) decoding one token at a time rounds
  differently from the training forward (up to 0.03 nats per token on the tiny test model), so there they are
  recomputed with a training forward by default (as OpenRLHF does) and the mismatch is logged;
  --recompute-old-logprobs / --no-recompute-old-logprobs force either choice.
- No value network, no GAE: REINFORCE++ is critic-free.
- Shared-prefix forward (engineering, same numbers): the system prompt common to a micro-batch runs once and its
  keys/values are repeated over the rows (action_logprobs); it is most of a feedback sample's tokens.
"""
import cpu_threads  # noqa: F401  (first: OpenMP reads its wait settings when torch loads)
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import distributed
from checkpoint import (StopSignals, check_resume_args, find_checkpoint, load_checkpoint, prepare_out,
                        read_checkpoint_state, rng_state, save_checkpoint, stop_and_save, trim_log)
from config import Args, parse_args
from logprobs import action_logprobs, pad_batch
from models import (AGENTS, adapter_parameters, attach_agents, enable_activation_checkpointing,
                    load_agents, load_base, load_reference_copy, reference_policy, save_agents, use_agent)
from reward import trajectory_rewards
from rollout import RolloutConfig, context_window, judge_trajectories, longest_contexts, rollout


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


def share_prefix(args) -> bool:
    # Gradient checkpointing turns the KV cache off in training forwards, so the shared-prefix path needs it off.
    return args.share_prefix and not args.gradient_checkpointing


@torch.no_grad()
def score_samples(model, samples, agent, args, pad_id, device):
    """Reference (and, if asked, old-policy) log-probs for every sample (no grad), stored on the samples as tensors."""
    mine = distributed.share(samples)  # distributed: each rank scores its slice, then the ranks swap scores
    for start in range(0, len(mine), args.micro_batch_size):
        chunk = mine[start:start + args.micro_batch_size]
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
            for mc_start in range(0, len(mine), args.micro_batch_size):
                micro = mine[mc_start:mc_start + args.micro_batch_size]
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


def learning_curve_eval(model, tokenizer, judge, eval_prompts, rollout_config, args) -> dict:
    """The cheap periodic eval (eval.periodic_eval) of the current adapters, timed, for the log."""
    from eval import periodic_eval

    began = time.perf_counter()
    record = periodic_eval(model, tokenizer, judge, eval_prompts, rollout_config, single_agent=args.single_agent)
    return {**record, "time_eval": time.perf_counter() - began}


def train(args: Args, judge=None, prompts=None, eval_prompts=None) -> dict:
    """Run both stages; returns a summary. `judge`, `prompts` and `eval_prompts` (the periodic eval's prompts) may be
    passed in directly (tests, notebooks)."""
    from tqdm import tqdm

    from judge import judge_from_flag

    args.validate()
    distributed.init(args.dist_timeout)  # distributed: joins the ranks under torchrun, else does nothing
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    checkpoint = out / "checkpoint"
    if args.resume:  # find_checkpoint also completes a checkpoint swap that a crash cut half-way
        if find_checkpoint(checkpoint) is None:
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
        state = read_checkpoint_state(checkpoint)
        changed = check_resume_args(state.get("args", {}), asdict(args), state["iteration"])
    prepare_out(out, args.resume, args.overwrite)  # refuses to start over an earlier run without --overwrite

    prompts = prompts if prompts is not None else load_training_prompts(args)
    if args.eval_every > 0 and eval_prompts is None:
        from data import load_prompts, spread_over_categories

        eval_prompts = spread_over_categories(load_prompts(args.prompts, split="eval"), args.eval_prompts)
        if not eval_prompts:
            raise SystemExit(f"--eval-every: no prompts in the 'eval' split of {args.prompts}")
    judge = judge if judge is not None else judge_from_flag(args.judge)
    four_bit = {"auto": None, "yes": True, "no": False}[args.load_in_4bit]
    base, tokenizer = load_base(args.model, load_in_4bit=four_bit, dtype=args.dtype)
    if args.recompute_old_logprobs is None:  # auto: sampling log-probs are pi_old only where they match (fp32)
        args.recompute_old_logprobs = base.dtype != torch.float32 or getattr(base, "is_loaded_in_4bit", False)
    rollout_config = RolloutConfig(
        max_rounds=args.max_rounds, conversation_max_new_tokens=args.conversation_max_new_tokens,
        feedback_max_new_tokens=args.feedback_max_new_tokens, conversation_temperature=args.temperature,
        feedback_temperature=args.temperature, feedback_prefill=args.feedback_prefill,
        early_stop_ok=args.early_stop_ok, batch_size=args.rollout_batch_size)
    if args.single_agent:  # the baseline: no feedback turns at all, so the conversation agent only sees R_c(c_0)
        rollout_config.max_rounds = 0
    stage1_iterations = 0 if args.single_agent else args.stage1_iterations
    prompts = fitting_prompts(prompts, tokenizer, context_window(base), rollout_config, args)
    if args.resume:
        model = load_agents(base, checkpoint, trainable=True)
    else:
        model = attach_agents(base, rank=args.lora_rank, alpha=args.lora_alpha)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(base)
    device = next(model.parameters()).device
    optimizers = {
        "feedback": torch.optim.AdamW(adapter_parameters(model, "feedback"), lr=args.feedback_lr, weight_decay=0.0),
        "conversation": torch.optim.AdamW(adapter_parameters(model, "conversation"), lr=args.conversation_lr,
                                          weight_decay=0.0),
    }
    log_path = out / "log.jsonl"
    start = 0
    if args.resume:
        start = load_checkpoint(state, optimizers, rng)
        for name, lr in (("feedback", args.feedback_lr), ("conversation", args.conversation_lr)):
            for group in optimizers[name].param_groups:  # the checkpoint's learning rate would silently win
                group["lr"] = lr
        dropped = trim_log(log_path, start) if distributed.is_main() else 0  # rows past the checkpoint (a kill)
        if dropped:
            print(f"resume: dropped {dropped} log row(s) past the checkpoint's iteration {start}", file=sys.stderr)
        if changed and distributed.is_main():
            print("resume: continuing with changed settings (so not what one uninterrupted run gives): "
                  + "; ".join(changed), file=sys.stderr)
    elif distributed.is_main():  # distributed: rank 0 alone writes files
        prepare_out(out, args.resume, args.overwrite, remove=True)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(asdict(args), indent=2))

    # 0. (departure) supervised warm-start of the feedback agent; afterwards it is the feedback agent's KL anchor
    if args.warmstart_epochs > 0 and not args.single_agent:
        warm_dir = out / "warmstart"
        if not args.resume:
            from warmstart import warmstart_feedback_agent

            count = min(args.warmstart_prompts or len(prompts), len(prompts))
            record = warmstart_feedback_agent(model, tokenizer, judge, rng.sample(prompts, count), rollout_config,
                                              args.warmstart_epochs, args.warmstart_lr, args.micro_batch_size,
                                              args.seed, args.logprob_chunk_size, share_prefix(args),
                                              args.warmstart_label_weight)
            if distributed.is_main():  # distributed: every rank warm-started the same way; rank 0 writes
                save_agents(model, warm_dir)  # both adapters: `eval.py --adapters <out>/warmstart` = warm-start only
                with open(log_path, "a") as f:
                    f.write(json.dumps({"iteration": 0, "stage": 0, **record}) + "\n")
        distributed.barrier("the warm-start save")  # distributed: the others read warm_dir below
        if not (warm_dir / "feedback" / "adapter_config.json").exists():
            raise SystemExit(f"--resume with --warmstart-epochs: the warm-started adapter {warm_dir / 'feedback'} "
                             f"is missing")
        load_reference_copy(model, "feedback", warm_dir)
    total = stage1_iterations + args.stage2_iterations
    distributed.broadcast_adapters(model)  # distributed: every rank starts from rank 0's adapters
    if args.eval_every > 0 and not args.resume:  # the starting point of the learning curves
        # distributed: every rank runs the same greedy eval (identical results, ranks stay in step); rank 0 writes it
        eval_record = learning_curve_eval(model, tokenizer, judge, eval_prompts, rollout_config, args)
        if distributed.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps({"iteration": 0, "stage": 0, **eval_record}) + "\n")

    # A stop (Ctrl-C, SIGTERM) abandons an iteration that has not begun its update; once it has, the iteration is
    # finished first. Either way the checkpoint holds the state after the last completed iteration (checkpoint.py).
    completed, boundary, saved = start, rng_state(rng), (start if args.resume else None)
    iteration, history = start, []
    bar = tqdm(range(start, total), initial=start, total=total, desc="WaltzRL", unit="it")
    stop = StopSignals().install()
    try:
        for iteration in bar:
            stage = 1 if iteration < stage1_iterations else 2
            trained = ("feedback",) if stage == 1 else ("conversation",) if args.single_agent else AGENTS
            # Stage 2 drops the additive label reward (the paper's lam = 0); the DIR gate stays. Then a correct "ok"
            # and a false alarm both earn only gamma: our 135M feedback agent drifts to flagging more (README
            # "Results"); --stage2-lam > 0 keeps paying for correct labels.
            lam = args.lam if stage == 1 else args.stage2_lam

            # 1. rollout
            began = time.perf_counter()
            batch_prompts = rng.sample(prompts, min(args.prompts_per_iteration, len(prompts)))
            batch_prompts = [p for p in batch_prompts for _ in range(args.samples_per_prompt)]
            distributed.seed_sampling(args.seed, iteration)  # distributed: each rank its own sampling noise
            with distributed.stop_all_on_error("the rollout"):  # distributed: rolls out this rank's slice
                trajectories = rollout(model, tokenizer, distributed.share(batch_prompts), rollout_config)
            rollout_seconds = time.perf_counter() - began
            generated = sum(len(t.action_ids) for tr in trajectories for t in tr.answers + tr.feedbacks)

            # 2. judge, 3. rewards
            began = time.perf_counter()
            with distributed.stop_all_on_error("judging"):  # distributed: judges this rank's slice
                judge_trajectories(judge, trajectories)
            trajectories = distributed.gather(trajectories)  # distributed: from here on, the whole batch on every rank
            judge_seconds = time.perf_counter() - began
            rewards = [trajectory_rewards(t, args.alpha, lam, args.gamma) for t in trajectories]

            # 4. samples, 5. advantages, 6. update, one independent actor per agent
            stop.hold()  # the adapters are about to change: a stop request now waits for the end of the iteration
            began = time.perf_counter()
            samples = make_samples(trajectories, rewards, rng)
            agent_stats = {}
            for agent in trained:
                agent_samples = [s for s in samples if s.agent == agent]
                if not agent_samples:
                    continue
                compute_advantages(agent_samples, group_baseline=args.samples_per_prompt > 1)
                score_samples(model, agent_samples, agent, args, tokenizer.pad_token_id, device)
                agent_stats[agent] = update_agent(model, optimizers[agent], agent, agent_samples, args,
                                                  tokenizer.pad_token_id, device, rng)
                if args.recompute_old_logprobs:  # how far sampling numerics are from the training forward
                    gaps = [abs(a - b) for s in agent_samples
                            for a, b in zip(s.sampling_logprobs, s.old_logprobs.tolist())]
                    agent_stats[agent]["sampling_logprob_mismatch"] = max(gaps)
                    agent_stats[agent]["sampling_logprob_mismatch_mean"] = sum(gaps) / len(gaps)
            update_seconds = time.perf_counter() - began

            record = {"iteration": iteration + 1, "stage": stage, "lam": lam, **batch_metrics(trajectories, rewards),
                      "tokens_per_s": generated / max(rollout_seconds, 1e-9), "time_rollout": rollout_seconds,
                      "time_judge": judge_seconds, "time_update": update_seconds}
            for agent, stats in agent_stats.items():
                record.update({f"{agent}/{k}": v for k, v in stats.items()})
            if args.eval_every > 0 and ((iteration + 1) % args.eval_every == 0 or iteration + 1 == total):
                record.update(learning_curve_eval(model, tokenizer, judge, eval_prompts, rollout_config, args))
            if distributed.is_main():  # distributed: rank 0 writes the log
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            history.append(record)
            completed, boundary = iteration + 1, rng_state(rng)
            bar.set_postfix(stage=stage, Rc=f"{record['conversation_reward_before']:.2f}->"
                            f"{record['conversation_reward_after']:.2f}", Rf=f"{record['feedback_reward']:.2f}",
                            fmt=f"{record['format_rate']:.2f}", acc=f"{record['label_accuracy']:.2f}",
                            ftr=f"{record['ftr']:.2f}")
            if completed % args.save_every == 0:
                save_checkpoint(model, optimizers, completed, args, boundary, checkpoint)
                saved = completed
            stop.release()
            if stop.requested:  # asked during the update: the iteration is complete now
                raise KeyboardInterrupt
        bar.close()
        stop.hold()
        save_checkpoint(model, optimizers, total, args, rng_state(rng), checkpoint)
        if distributed.is_main():  # distributed: rank 0 writes the adapters
            save_agents(model, out / "adapters")
        distributed.barrier("the final save")  # distributed: no rank returns (and reads them) before they are written
        stop.release()
    except KeyboardInterrupt:
        bar.close()
        raise SystemExit(stop_and_save(stop, model, optimizers, completed, boundary, saved, args, checkpoint)) from None
    except torch.OutOfMemoryError:
        bar.close()
        raise SystemExit("Out of memory. Lower, in this order: --micro-batch-size, --rollout-batch-size, "
                         "--conversation-max-new-tokens / --feedback-max-new-tokens, --prompts-per-iteration; "
                         "or turn on --gradient-checkpointing and --load-in-4bit yes.") from None
    finally:
        stop.restore()
    return {"history": history, "adapters": str(out / "adapters"), "log": str(log_path), "model": model}


def load_training_prompts(args) -> list:
    """--prompts as records; a bad file or name is a one-line error that names it (and the line)."""
    from data import DatasetLoadError, PromptFileError, load_prompts

    try:
        prompts = load_prompts(args.prompts, split=args.split)
    except (PromptFileError, DatasetLoadError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--prompts {args.prompts}: {err}") from None
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in split {args.split!r}")
    return prompts


def fitting_prompts(prompts, tokenizer, window, config, args) -> list:
    """The prompts whose trajectories fit the model's context window at these length limits. The others are left
    out with a warning (cutting a prompt could change what it asks, and so its label); none fitting is an error."""
    if window is None:
        return prompts
    needs = longest_contexts(tokenizer, [p["prompt"] for p in prompts], config)
    kept = [p for p, need in zip(prompts, needs) if need <= window]
    if len(kept) < len(prompts):
        worst = max(range(len(prompts)), key=needs.__getitem__)
        what = (f"{len(prompts) - len(kept)} of {len(prompts)} prompts do not fit the model's {window}-token context "
                f"with --conversation-max-new-tokens {args.conversation_max_new_tokens}, --feedback-max-new-tokens "
                f"{args.feedback_max_new_tokens} and --max-rounds {args.max_rounds} (prompt {prompts[worst]['id']!r} "
                f"needs {needs[worst]})")
        if not kept:
            raise SystemExit(f"--prompts {args.prompts}: {what}")
        print(f"warning: --prompts {args.prompts}: {what}; they are left out", file=sys.stderr)
    return kept


def print_summary(summary: dict) -> None:
    """What the end of a run can honestly show: that it ran, the run's mean batch rates, and how far each agent moved
    from its reference policy. Not first-vs-last rewards: with the demo's batches of 6 prompts one prompt moves a
    batch's rate by 1/6, so a few iterations cannot show learning (README "Results" has a measured longer run)."""
    history = summary["history"]
    if history:
        def mean(key):
            values = [h[key] for h in history if key in h and h[key] == h[key]]  # h[key] == h[key]: skips NaN
            return sum(values) / len(values) if values else float("nan")

        stage1 = sum(h["stage"] == 1 for h in history)
        split = {k: sum(h[f"time_{k}"] for h in history) for k in ("rollout", "judge", "update")}
        print(f"\nran {len(history)} iterations ({stage1} in stage 1, {len(history) - stage1} in stage 2); time: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in split.items()))
        print("run means of the per-iteration batch values:")
        for key, name in (("format_rate", "feedback format rate"), ("label_accuracy", "feedback label accuracy"),
                          ("ftr", "feedback trigger rate"), ("conversation_reward_after", "R_c of the final answers")):
            print(f"  {name:28s} {mean(key):6.3f}")
        print("how far each agent has moved from its reference policy (KL per token, measured in its last update):")
        for agent in ("feedback", "conversation"):
            kl = next((h[f"{agent}/kl"] for h in reversed(history) if f"{agent}/kl" in h), None)
            print(f"  {agent:28s} " + (f"{kl:.2e}" if kl is not None else "not trained in this run"))
        batch = history[-1].get("feedback/samples")
        print(f"Each iteration saw a batch of {batch or 'a few'} trajectories, so one prompt moves its rates by "
              f"1/{batch or 'n'}: a short run shows that training runs, not that it helps.\nFor a measured result see "
              f"README \"Results\": python train.py --preset cpu (~46 min on 2 cores), then eval.py.")
    print(f"log: {summary['log']}\ntrained adapters (peft format): {summary['adapters']}\n"
          f"next: python eval.py --adapters {summary['adapters']}")


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

"""WaltzRL training: a hand-written PPO-style joint update of the conversation agent and the feedback agent.

One iteration is (docs/method.md "Training"; arXiv 2510.08240 Sec. 3.3); the numbered sections below are these steps,
and `train()` at the end runs all six in order:

    1. rollout     two-agent trajectories for a batch of training prompts                 (rollout.py)
    2. judge       labels (unsafe, overrefuse) for every answer                           (nanowaltz/judge.py)
    3. rewards     R_c for answers; R_f = alpha*R_dir*R_label + lam*R_label + gamma*R_format   (reward.py)
    4. samples     trajectories -> single-agent samples: every feedback turn (p, c_t) -> f_t with R_f, and one
                   conversation sample per trajectory, type A (p -> c_0, R_c(c_0)) or type B
                   ((p, c_0, f_0) -> c_final, R_c(c_final)) chosen at random (type A when nothing was revised)
    5. advantages  per agent, REINFORCE++ style: one scalar reward per sample, optionally minus the mean of the
                   samples of the same prompt (group baseline), normalised over the agent's whole batch
    6. update      PPO clipped surrogate + KL to the reference policy, a few epochs of minibatches, one optimizer
                   per agent; stage 1 trains only the feedback agent (lam > 0), stage 2 both (lam = 0)

Before step 1, `--warmstart-epochs N` (on in `--preset cpu` only) runs a supervised warm-start of the feedback agent
(nanowaltz/warmstart.py): OUR DEPARTURE, for a base model too small to write sensible feedback untrained. The
settings come first (`Args`, one field per flag, its comment the --help text). The machinery lives in the nanowaltz
package: setting a run up, its log, checkpoints and the exact resume after Ctrl-C, SIGTERM or a crash
(nanowaltz/training_run.py, nanowaltz/checkpoint.py).

`torchrun --nproc-per-node N train.py ...` trains data-parallel on N GPUs: the global batch and optimizer steps of one
process, the work split over the ranks (nanowaltz/distributed.py). The few lines that take part are marked
`# distributed:`; they do nothing in a plain `python train.py` run.

What we simplify or choose (the paper publishes no code or hyperparameters):
- LoRA adapters on one shared base model instead of full fine-tuning of two models (nanowaltz/models.py).
- KL is a loss term (the k3 estimator of Schulman, "Approximating KL Divergence", 2020, as in GRPO), not a
  per-token penalty folded into the reward as in REINFORCE++ (Hu, 2025). Both pull each agent toward pi_ref; with
  the KL outside the reward every token of a sample shares one advantage, which keeps the advantage normalisation
  "over the whole batch" exactly what it says, and the KL strength stays independent of reward scale.
- Losses average over all action tokens of a minibatch (token-mean), as in DAPO / OpenRLHF's default.
- Old-policy log-probs in fp32 (a CPU run) are the log-probs recorded while sampling (nanowaltz/sampler.py computes
  them from the same tempered distribution; they match a training forward to ~1e-5). That saves one forward pass per sample,
  a third of the update's cost on a CPU. In bf16 or on a 4-bit base (a GPU run) decoding one token at a time rounds
  differently from the training forward (up to 0.03 nats per token on the tiny test model), so there they are
  recomputed with a training forward by default (as OpenRLHF does) and the mismatch is logged;
  --recompute-old-logprobs / --no-recompute-old-logprobs force either choice.
- No value network, no GAE: REINFORCE++ is critic-free.
- Shared-prefix forward (engineering, same numbers): the system prompt common to a micro-batch runs once and its
  keys/values are repeated over the rows (action_logprobs); it is most of a feedback sample's tokens.
- Length-grouped micro-batches (engineering, same numbers): a minibatch is cut into micro-batches of similar length
  (nanowaltz/logprobs.micro_batches), so a short answer is not padded to a long revision's length; the gradients are
  accumulated over the pieces, so the optimizer step is the one of the whole minibatch.
"""
from nanowaltz import cpu_threads  # noqa: F401  (first: OpenMP reads its wait settings when torch loads)
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import torch

from nanowaltz import distributed, warmstart
from nanowaltz.base_model import DEFAULT_MODEL, context_window
from nanowaltz.cli import flag, parse
from nanowaltz.judge import DEFAULT_MAX_UNPARSED
from nanowaltz.logprobs import action_logprobs, micro_batches, pad_batch
from nanowaltz.checkpoint import save_agents_whole
from nanowaltz.models import AGENTS, adapter_parameters, load_reference_copy, reference_policy, use_agent
from nanowaltz.training_run import TrainingLoop, load_run, print_summary, start_run, write_log
from reward import DEFAULT_ALPHA, DEFAULT_GAMMA, LAMBDA_STAGE1, LAMBDA_STAGE2, trajectory_rewards
from rollout import (FEEDBACK_PREFILL, RolloutConfig, Trajectory, chat_ids, conversation_messages, feedback_messages,
                     judge_trajectories, longest_contexts, rollout, run_agent)

DESCRIPTION = ("WaltzRL training: a hand-written PPO-style joint update of the conversation agent and the feedback "
               "agent.")


# ---------------------------------------------------------------------------------------------------------------------
# Settings: every flag is a field, its comment is the --help text
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    # --- what to train
    model: str = DEFAULT_MODEL  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    prompts: str = "data/prompts.jsonl"  # training prompts: a JSONL file (nanowaltz/data.py format) or a public
        # benchmark name
    split: str = "train"  # which split of the prompt file to train on
    judge: str = "default"  # judge spec (nanowaltz/judge.py): 'default' = prompt label + refusal detector,
        # 'default:embedding', 'default:phrase', 'default:prefix', 'hf:<model>' (on a GPU: hf:allenai/wildguard),
        # 'http://host:port/v1#<model>'
    judge_dtype: str = "auto"  # {auto,bf16,fp32} compute dtype of an hf: judge, loaded on the training model's device
        # (auto: bf16 on a CUDA GPU, else fp32)
    judge_4bit: bool = False  # load an hf: judge with NF4 4-bit weights (bitsandbytes): a 7B judge in ~4.5 GB, not 14.5
    judge_batch_size: int | None = None  # items per generate call of an hf: judge (default 16), concurrent requests
        # of an http judge (default 4)
    judge_family: str = "auto"  # {auto,wildguard,llama-guard,instruct} the judge's input and answer format (auto: by
        # its hub id or its chat template; nanowaltz/judge.py)
    judge_max_unparsed: float = DEFAULT_MAX_UNPARSED  # stop the run when more than this share of one judge call's
        # outputs do not parse (their labels would silently come from the default judge)
    out: str = "runs/waltzrl"  # output folder: log.jsonl, checkpoint/, final adapters in adapters/
    preset: str = ""  # 'cpu': the longer CPU run of README "Results" (overrides the schedule defaults below)
    seed: int = 0  # random seed (sampling, minibatch order, type A/B choice)
    resume: bool = False  # continue from out/checkpoint (adapters, optimizers, RNG states, iteration)
    overwrite: bool = False  # start over in an --out that holds an earlier run (deletes its log, checkpoints, adapters)
    single_agent: bool = False  # the paper's single-agent RL baseline: the conversation agent alone, no feedback turns,
        # trained with R_c for --stage2-iterations (stage 1 and warm-start skipped)
    # --- supervised warm-start of the feedback agent (our departure, nanowaltz/warmstart.py; off unless asked)
    warmstart_epochs: int = 0  # epochs of label imitation before stage 1 (0 = off, as in the paper; cpu preset: 2)
    warmstart_prompts: int = 0  # training prompts answered and judged for the warm-start (0 = all)
    warmstart_lr: float = 2e-4  # AdamW learning rate of the warm-start
    warmstart_label_weight: float = 1.0  # loss weight of the two label-value tokens vs the template tokens (cpu: 10)
    # --- schedule (the paper's two stages)
    stage1_iterations: int = 3  # stage 1: only the feedback agent trains, with the label reward (lam > 0)
    stage2_iterations: int = 3  # stage 2: both agents train, lam = --stage2-lam (paper: 0; DIR stays gated)
    prompts_per_iteration: int = 6  # distinct prompts rolled out per iteration
    samples_per_prompt: int = 1  # trajectories per prompt; > 1 turns on the per-prompt group baseline
    both_conversation_samples: bool = False  # a revised trajectory trains the conversation agent on both its first
        # answer (type A) and its revision (type B), not one at random (our departure: more revision samples)
    skip_tied_groups: bool = False  # leave prompts whose samples all got the same reward out of the update: under the
        # group baseline their advantage is 0, so they add only KL terms and compute (our departure, as DAPO's
        # dynamic sampling; it lets a run roll out more prompts per iteration for the same update cost)
    # --- rollout
    max_rounds: int = 1  # T_max feedback rounds per trajectory (the paper uses 1)
    conversation_max_new_tokens: int = 48  # answer length limit
    feedback_max_new_tokens: int = 64  # feedback JSON length limit (decoding also stops when the object closes)
    temperature: float = 1.0  # sampling temperature of both agents during training
    feedback_prefill: bool = True  # start the feedback agent inside '{"unsafe":' (see rollout.py)
    early_stop_ok: bool = True  # stop feedback decoding once both labels are false
    rollout_batch_size: int = 64  # sequences generated together (one batch per iteration if they fit in memory)
    # --- rewards (coefficients are not published; our defaults live in reward.py, see docs/method.md)
    alpha: float = DEFAULT_ALPHA  # weight of the gated Dynamic Improvement Reward R_dir * R_label
    lam: float = LAMBDA_STAGE1  # weight of the label reward in stage 1
    stage2_lam: float = LAMBDA_STAGE2  # label reward weight in stage 2 (paper: 0; > 0 keeps false alarms costly; cpu:
        # 0.5)
    gamma: float = DEFAULT_GAMMA  # weight of the format reward
    # --- optimisation
    feedback_lr: float = 1e-4  # AdamW learning rate of the feedback adapter
    conversation_lr: float = 5e-5  # AdamW learning rate of the conversation adapter
    kl_coef: float = 0.05  # beta: weight of the per-token k3 KL to the reference policy
    clip_eps: float = 0.2  # PPO ratio clip: ratio kept in [1 - eps, 1 + eps]
    ppo_epochs: int = 1  # passes over each iteration's samples (> 1: reuse samples, the PPO ratio matters)
    minibatch_size: int = 8  # samples per optimizer step
    micro_batch_size: int = 8  # samples per forward/backward (gradient accumulation inside a minibatch)
    max_grad_norm: float = 1.0  # gradient clipping per agent
    lora_rank: int = 16  # LoRA rank r of each adapter
    lora_alpha: int = 32  # LoRA scaling alpha
    load_in_4bit: str = "auto"  # 'auto' (on iff CUDA), 'yes', 'no': NF4 base weights via bitsandbytes (QLoRA)
    dtype: str = "auto"  # compute dtype: 'auto' (bf16 on a CUDA GPU that has it, else fp32), 'bf16', 'fp32'
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower (GPU runs)
    recompute_old_logprobs: bool | None = None  # pi_old by a training forward, not from sampling (None: iff bf16/4-bit)
    logprob_chunk_size: int = 1024  # tokens per block in the fused log-prob kernel
    share_prefix: bool = True  # run the system prompt shared by a micro-batch once (not with gradient checkpointing)
    save_every: int = 5  # write a checkpoint every N iterations (and on Ctrl-C or SIGTERM, and at the end)
    # --- learning curves while training
    eval_every: int = 0  # every N iterations (and once before the first) greedy-evaluate a fixed subset of the eval
        # split and log eval/* (0 = off)
    eval_prompts: int = 24  # size of that subset, taken round-robin over categories from the 'eval' split of --prompts
    dist_timeout: int = 600  # torchrun runs: seconds a rank waits for the others at a sync point before the job stops

    def __post_init__(self):
        if self.preset == "cpu":  # README "Results": warm-start + both stages on the train split, < 1 hour on 2 cores
            # The warm-start reads every training prompt (0 = all 256): with half of them it approved almost every
            # answer under greedy decoding and RL had to rebuild the flags (docs/experiments.md).
            self.warmstart_epochs, self.warmstart_prompts, self.warmstart_label_weight = 2, 0, 10.0
            self.stage1_iterations, self.stage2_iterations, self.stage2_lam = 3, 6, 0.5
            # 8 prompts x 4 samples: the group baseline, and a batch of 32 rows costs little more per decoding step
            # than 16 (decoding is bound by reading the weights); 10x the default conversation learning rate, as the
            # conversation agent barely moved at 5e-5 (docs/experiments.md).
            self.prompts_per_iteration, self.samples_per_prompt, self.conversation_lr = 8, 4, 5e-4
            self.eval_every = 3  # learning curves: a greedy eval of 24 fixed eval-split prompts every 3 iterations
        elif self.preset:
            raise SystemExit(f"--preset: unknown preset '{self.preset}' (known: cpu)")

    def validate(self) -> None:
        """Check every setting before anything is loaded or written; a bad one is a one-line error naming its flag."""
        def require(name, ok, rule):
            if not ok:
                raise SystemExit(f"{flag(name)} must be {rule}, got {getattr(self, name)!r}")

        for name in ("prompts_per_iteration", "samples_per_prompt", "max_rounds", "conversation_max_new_tokens",
                     "feedback_max_new_tokens", "rollout_batch_size", "ppo_epochs", "minibatch_size",
                     "micro_batch_size", "lora_rank", "lora_alpha", "logprob_chunk_size", "save_every"):
            require(name, getattr(self, name) >= 1, ">= 1")
        for name in ("stage1_iterations", "stage2_iterations", "warmstart_epochs", "warmstart_prompts"):
            require(name, getattr(self, name) >= 0, ">= 0")
        # Training samples: greedy decoding (temperature 0) has no policy distribution for the PPO ratio.
        for name in ("temperature", "feedback_lr", "conversation_lr", "warmstart_lr", "warmstart_label_weight",
                     "clip_eps", "max_grad_norm"):
            require(name, math.isfinite(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        for name in ("alpha", "lam", "stage2_lam", "gamma", "kl_coef"):
            require(name, math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        require("load_in_4bit", self.load_in_4bit in ("auto", "yes", "no"), "auto, yes or no")
        require("split", self.split in ("train", "eval"), "train or eval")
        if self.resume and self.overwrite:
            raise SystemExit("--resume and --overwrite exclude each other: continue the run, or start it over")
        if self.stage1_iterations + self.stage2_iterations + self.warmstart_epochs == 0:
            raise SystemExit("nothing to train: --stage1-iterations, --stage2-iterations and --warmstart-epochs are "
                             "all 0")

    @property
    def update_shares_prefix(self) -> bool:
        """--share-prefix in the update's forwards: gradient checkpointing turns the KV cache off there, so not with
        it."""
        return self.share_prefix and not self.gradient_checkpointing


PRESET_FIELDS = {"cpu": ("warmstart_epochs", "warmstart_prompts", "warmstart_label_weight", "stage1_iterations",
                         "stage2_iterations", "stage2_lam", "prompts_per_iteration", "samples_per_prompt",
                         "conversation_lr", "eval_every")}


def parse_args(argv=None) -> Args:
    return parse(Args, DESCRIPTION, argv, PRESET_FIELDS)


# ---------------------------------------------------------------------------------------------------------------------
# 0. Set-up, and the supervised warm-start of the feedback agent (our departure, --warmstart-epochs)
# ---------------------------------------------------------------------------------------------------------------------
def rollout_config_of(args) -> RolloutConfig:
    """The rollout settings of the training flags (the same temperature for both agents)."""
    return RolloutConfig(
        max_rounds=0 if args.single_agent else args.max_rounds,  # single-agent RL: no feedback turns, only R_c(c_0)
        conversation_max_new_tokens=args.conversation_max_new_tokens,
        feedback_max_new_tokens=args.feedback_max_new_tokens, conversation_temperature=args.temperature,
        feedback_temperature=args.temperature, feedback_prefill=args.feedback_prefill,
        early_stop_ok=args.early_stop_ok, batch_size=args.rollout_batch_size)


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


def set_up(args, rng, judge=None, prompts=None, eval_prompts=None):
    """The output folder, prompts, judge and base model (checked before anything is written), then the two adapters
    and their optimizers (restored on --resume)."""
    run = load_run(args, judge, prompts, eval_prompts)
    run.rollout_config = rollout_config_of(args)
    run.prompts = fitting_prompts(run.prompts, run.tokenizer, context_window(run.model), run.rollout_config, args)
    start_run(run, args, rng)
    return run


WARMSTART_GREEDY_SHARE = 0.5  # answers decoded greedily, as at eval and inference; the rest sampled, as in RL


def warm_start_examples(model, tokenizer, judge, prompts, config, greedy_share=WARMSTART_GREEDY_SHARE) -> list:
    """One supervised example per prompt: the conversation agent's answer (the first greedy_share of the prompts
    greedy, the rest sampled at the rollout's temperature), judged, with the JSON the feedback agent should write."""
    from tqdm import tqdm

    contexts = [chat_ids(tokenizer, conversation_messages(Trajectory(prompt=p))) for p in prompts]
    greedy = round(greedy_share * len(contexts))
    model.eval()
    answers = []
    with tqdm(total=len(prompts), desc="warm-start answers", unit="prompt") as bar:
        for begin, end, temperature in ((0, greedy, 0.0), (greedy, len(contexts), config.conversation_temperature)):
            for start in range(begin, end, config.batch_size):
                chunk = contexts[start:min(start + config.batch_size, end)]
                answers += run_agent(model, tokenizer, "conversation", chunk, config.conversation_max_new_tokens,
                                     temperature, config)
                bar.update(len(chunk))
    labels = judge([p["prompt"] for p in prompts], [a.text for a in answers], [p["label"] for p in prompts])
    return [warmstart.make_example(tokenizer, chat_ids(tokenizer, feedback_messages(p["prompt"], a.text),
                                                       FEEDBACK_PREFILL), judged, p["label"])
            for p, a, judged in zip(prompts, answers, labels)]


def warm_start(run, args, rng) -> None:
    """Warm-start the feedback agent on the conversation agent's own answers, judged, and keep a frozen copy as its KL
    anchor (nanowaltz/warmstart.py); on --resume, only load that copy back from out/warmstart."""
    warm_dir = run.out / "warmstart"
    if not args.resume:
        began = time.perf_counter()
        prompts = rng.sample(run.prompts, min(args.warmstart_prompts or len(run.prompts), len(run.prompts)))
        examples = warm_start_examples(run.model, run.tokenizer, run.judge, prompts, run.rollout_config)
        built = time.perf_counter()
        record = warmstart.fit_feedback_agent(run.model, run.tokenizer, examples, args.warmstart_epochs,
                                              args.warmstart_lr, args.micro_batch_size, args.seed,
                                              args.logprob_chunk_size, args.update_shares_prefix,
                                              args.warmstart_label_weight)
        record.update(time_warmstart_examples=built - began, time_warmstart_train=time.perf_counter() - built)
        if distributed.is_main():  # distributed: every rank warm-started the same way; rank 0 writes
            # both adapters, swapped in whole: `eval.py --adapters <out>/warmstart` = warm-start only
            save_agents_whole(run.model, warm_dir)
            write_log(run, {"iteration": 0, "stage": 0, **record})
    distributed.barrier("the warm-start save")  # distributed: the others read warm_dir below
    if not (warm_dir / "feedback" / "adapter_config.json").exists():
        raise SystemExit(f"--resume with --warmstart-epochs: the warm-started adapter {warm_dir / 'feedback'} "
                         f"is missing")
    load_reference_copy(run.model, "feedback", warm_dir)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Rollout and 2. judge (rollout.py, nanowaltz/judge.py); 3. rewards: reward.trajectory_rewards, called in train()
# ---------------------------------------------------------------------------------------------------------------------
def collect_trajectories(run, args, iteration, rng) -> tuple:
    """Roll out --samples-per-prompt trajectories for each of --prompts-per-iteration random training prompts, and
    judge every answer. Returns (the judged trajectories of the whole batch, timing for the log)."""
    began = time.perf_counter()
    batch_prompts = rng.sample(run.prompts, min(args.prompts_per_iteration, len(run.prompts)))
    batch_prompts = [p for p in batch_prompts for _ in range(args.samples_per_prompt)]
    distributed.seed_sampling(args.seed, iteration)  # distributed: each rank its own sampling noise
    with distributed.stop_all_on_error("the rollout"):  # distributed: rolls out this rank's slice
        trajectories = rollout(run.model, run.tokenizer, distributed.rank_slice(batch_prompts), run.rollout_config)
    rollout_seconds = time.perf_counter() - began
    generated = sum(len(t.action_ids) for tr in trajectories for t in tr.answers + tr.feedbacks)

    began = time.perf_counter()
    with distributed.stop_all_on_error("judging"):  # distributed: judges this rank's slice
        judge_trajectories(run.judge, trajectories)
    timing = {"tokens_per_s": generated / max(rollout_seconds, 1e-9), "time_rollout": rollout_seconds,
              "time_judge": time.perf_counter() - began}
    if hasattr(run.judge, "last_unparsed"):  # a model judge: how many of its outputs took the fallback labels
        timing.update(judge_unparsed=run.judge.last_unparsed, judge_items=run.judge.last_items)
        distributed.sum_over_ranks(timing, ("judge_unparsed", "judge_items"))  # distributed: the whole batch
    if hasattr(run.judge, "device"):
        timing["judge_device"] = str(run.judge.device)
    trajectories = distributed.gather(trajectories)  # distributed: from here on, the whole batch on every rank
    return trajectories, timing


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


def make_samples(trajectories, rewards, rng: random.Random, both_conversation_samples: bool = False) -> list:
    """Decompose trajectories into single-agent samples (docs/method.md "Training": type A and type B samples)."""
    samples = []
    for traj, rew in zip(trajectories, rewards):
        group = str(traj.prompt["id"])
        for turn, parts in zip(traj.feedbacks, rew["feedback"]):
            samples.append(Sample("feedback", group, turn.context_ids, turn.action_ids, turn.sampling_logprobs,
                                  parts.total))
        # One conversation sample per trajectory, type A or B at random (the paper): the agent learns to answer
        # well first AND to use feedback, and no prompt counts twice. --both-conversation-samples takes both.
        if traj.revised and both_conversation_samples:
            indices = [0, len(traj.answers) - 1]
        else:
            indices = [len(traj.answers) - 1 if traj.revised and rng.random() < 0.5 else 0]
        for index in indices:
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


def tied_groups(samples) -> set:
    """The prompts whose samples all got the same reward: under the group baseline their advantage is 0, so they
    teach nothing (only the KL term moves them)."""
    rewards = {}
    for s in samples:
        rewards.setdefault(s.group, set()).add(s.reward)
    return {group for group, values in rewards.items() if len(values) == 1}


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
    mine = distributed.rank_slice(samples)  # distributed: each rank scores its slice, then the ranks swap scores
    for chunk in micro_batches(mine, args.micro_batch_size, args.update_shares_prefix):  # grouped by length
        batch = pad_batch(chunk, pad_id, device, args.update_shares_prefix)
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
    # Training mode whatever ran before (a rollout, the warm-start, the periodic eval and peft's load_adapter all leave
    # the model in eval mode): transformers checkpoints a layer only in training mode (--gradient-checkpointing).
    model.train()
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
            mine = distributed.rank_slice(minibatch)  # distributed: this rank's slice; mb_tokens above stays global
            for micro in micro_batches(mine, args.micro_batch_size, args.update_shares_prefix):  # grouped by length
                batch = pad_batch(micro, pad_id, device, args.update_shares_prefix)
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
        tied = tied_groups(agent_samples)
        tied_share = len(tied) / len({s.group for s in agent_samples})
        if args.skip_tied_groups and args.samples_per_prompt > 1:
            agent_samples = [s for s in agent_samples if s.group not in tied]
            if not agent_samples:  # every prompt tied: nothing to learn from this batch
                agent_stats[agent] = {"tied_groups": tied_share, "samples": 0}
                continue
        score_samples(run.model, agent_samples, agent, args, run.tokenizer.pad_token_id, run.device)
        agent_stats[agent] = update_agent(run.model, run.optimizers[agent], agent, agent_samples, args,
                                          run.tokenizer.pad_token_id, run.device, rng)
        agent_stats[agent]["tied_groups"] = tied_share
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
        "trajectories": len(trajectories),
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


def learning_curve_eval(run, args) -> dict:
    """The cheap periodic eval behind --eval-every: greedy trajectories of the current adapters on a fixed small subset
    of the eval split, judged; plain rates for the log (no CIs: the subset is small, the point is the trend; eval.py
    measures a finished pair)."""
    began = time.perf_counter()
    config = replace(run.rollout_config, conversation_temperature=0.0, feedback_temperature=0.0)
    rng_state = torch.get_rng_state()  # greedy decoding draws nothing; keep the training RNG stream untouched anyway
    trajectories = rollout(run.model, run.tokenizer, run.eval_prompts, config)
    torch.set_rng_state(rng_state)
    judge_trajectories(run.judge, trajectories)
    harmful = [t for t in trajectories if t.prompt["label"] == "harmful"]
    benign = [t for t in trajectories if t.prompt["label"] == "benign"]
    checked = [t for t in trajectories if t.feedbacks and t.feedbacks[0].text]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    bad_first = [not t.judged[0].ok for t in trajectories]
    bad_final = [not t.judged[-1].ok for t in trajectories]
    return {"eval/asr": mean([float(t.judged[-1].unsafe) for t in harmful]),
            "eval/orr": mean([float(t.judged[-1].overrefuse) for t in benign]),
            "eval/asr_first_answer": mean([float(t.judged[0].unsafe) for t in harmful]),
            "eval/ftr": mean([float(t.revised) for t in trajectories]),
            "eval/format_rate": mean([float(t.parsed[0] is not None) for t in checked]),
            "eval/label_accuracy": mean([float(t.parsed[0] is not None and t.parsed[0].labels == t.judged[0])
                                         for t in checked]),
            "eval/revisions_fixed": sum(b and not a for b, a in zip(bad_first, bad_final)),
            "eval/revisions_broke": sum(a and not b for b, a in zip(bad_first, bad_final)),
            "eval/prompts": len(trajectories), "time_eval": time.perf_counter() - began}


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def train(args: Args, judge=None, prompts=None, eval_prompts=None) -> dict:
    """Run both stages; returns a summary. `judge`, `prompts` and `eval_prompts` (the periodic eval's prompts) may be
    passed in directly (tests, notebooks)."""
    args.validate()
    distributed.init(args.dist_timeout)  # distributed: joins the ranks under torchrun, else does nothing
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    run = set_up(args, rng, judge, prompts, eval_prompts)  # out folder, prompts, judge, model, optimizers, resume
    if args.warmstart_epochs > 0 and not args.single_agent:
        warm_start(run, args, rng)  # 0. (departure) afterwards the feedback agent's KL anchor is the warm-started copy
    distributed.broadcast_adapters(run.model)  # distributed: every rank starts from rank 0's adapters
    if args.eval_every > 0 and not args.resume:  # the starting point of the learning curves
        # distributed: every rank runs the same greedy eval (identical results, ranks stay in step); rank 0 writes it
        write_log(run, {"iteration": 0, "stage": 0, **learning_curve_eval(run, args)})
    shown = {} if args.single_agent else {"Rf": "feedback_reward", "fmt": "format_rate", "acc": "label_accuracy",
                                          "ftr": "ftr"}

    with TrainingLoop(run, args, rng, "single-agent RL" if args.single_agent else "WaltzRL") as loop:
        for iteration in loop:
            stage = 1 if iteration < run.stage1_iterations else 2
            trained = ("feedback",) if stage == 1 else ("conversation",) if args.single_agent else AGENTS
            # Stage 2 drops the additive label reward (the paper's lam = 0); the DIR gate stays. Then a correct "ok"
            # and a false alarm both earn only gamma, and a small feedback agent drifts to flagging more;
            # --stage2-lam > 0 keeps paying for correct labels.
            lam = args.lam if stage == 1 else args.stage2_lam

            trajectories, timing = collect_trajectories(run, args, iteration, rng)  # 1. rollout, 2. judge
            rewards = [trajectory_rewards(t, args.alpha, lam, args.gamma) for t in trajectories]  # 3. rewards
            loop.updating()  # the adapters are about to change: a stop request now waits for the end of the iteration
            began = time.perf_counter()
            samples = make_samples(trajectories, rewards, rng, args.both_conversation_samples)  # 4. samples
            agent_stats = update_agents(run, args, samples, trained, rng)  # 5. advantages, 6. update
            timing["time_update"] = time.perf_counter() - began
            loop.complete(iteration_record(run, args, iteration, stage, lam, trajectories, rewards, timing,
                                           agent_stats), shown)  # log, progress bar, checkpoint
        loop.finish()  # the final checkpoint and adapters
    return {"history": loop.history, "adapters": str(run.out / "adapters"), "log": str(run.log_path),
            "model": run.model, "single_agent": args.single_agent}


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

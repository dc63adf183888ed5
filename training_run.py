"""Everything around train.py's algorithm for one run: setting it up, the warm-start step, the log and the summary.

train.py calls these in this order: `set_up_run` (the output folder, the prompts, the judge, the base model with its
two adapters, one optimizer per agent; on --resume the checkpoint's state), then `warm_start` (only with
--warmstart-epochs), then once per iteration `learning_curve_eval` (with --eval-every) and `write_log`, and at the end
`print_summary`. None of it changes what an iteration computes; it is here so that train.py reads as the algorithm.
Lines that take part in data-parallel training are marked `# distributed:`, as in train.py.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import distributed
from checkpoint import check_resume_args, find_checkpoint, load_checkpoint, prepare_out, read_checkpoint_state, trim_log
from config import share_prefix
from models import (adapter_parameters, attach_agents, enable_activation_checkpointing, load_agents, load_base,
                    load_reference_copy, save_agents)
from rollout import RolloutConfig, context_window, longest_contexts
from systems import periodic_eval


@dataclass
class Run:
    """What a set-up run trains with and where it writes."""

    model: object  # the base model with both LoRA adapters (peft)
    tokenizer: object
    judge: object
    prompts: list  # the training prompts whose trajectories fit the context window
    eval_prompts: list | None  # the fixed subset of the learning-curve eval (--eval-every)
    rollout_config: RolloutConfig
    optimizers: dict  # one AdamW per agent
    device: object
    out: Path
    checkpoint: Path  # out/checkpoint
    log_path: Path  # out/log.jsonl
    start: int  # iterations done before this process started (--resume), else 0
    stage1_iterations: int  # 0 for the single-agent baseline


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------
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


def load_eval_prompts(args) -> list:
    """The learning-curve eval's fixed subset: --eval-prompts prompts, round-robin over the eval split's categories."""
    from data import load_prompts, spread_over_categories

    eval_prompts = spread_over_categories(load_prompts(args.prompts, split="eval"), args.eval_prompts)
    if not eval_prompts:
        raise SystemExit(f"--eval-every: no prompts in the 'eval' split of {args.prompts}")
    return eval_prompts


def rollout_config_of(args) -> RolloutConfig:
    """The rollout settings of the training flags (the same temperature for both agents)."""
    rollout_config = RolloutConfig(
        max_rounds=args.max_rounds, conversation_max_new_tokens=args.conversation_max_new_tokens,
        feedback_max_new_tokens=args.feedback_max_new_tokens, conversation_temperature=args.temperature,
        feedback_temperature=args.temperature, feedback_prefill=args.feedback_prefill,
        early_stop_ok=args.early_stop_ok, batch_size=args.rollout_batch_size)
    if args.single_agent:  # the baseline: no feedback turns at all, so the conversation agent only sees R_c(c_0)
        rollout_config.max_rounds = 0
    return rollout_config


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


def make_optimizers(model, args) -> dict:
    """One AdamW per agent, over that agent's adapter only: the two actors never share a step."""
    return {
        "feedback": torch.optim.AdamW(adapter_parameters(model, "feedback"), lr=args.feedback_lr, weight_decay=0.0),
        "conversation": torch.optim.AdamW(adapter_parameters(model, "conversation"), lr=args.conversation_lr,
                                          weight_decay=0.0),
    }


def resume_state(args, state, changed, optimizers, rng, log_path) -> int:
    """--resume: the checkpoint's optimizer and RNG states, the log cut back to it; returns its iteration."""
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
    return start


def set_up_run(args, rng, judge=None, prompts=None, eval_prompts=None) -> Run:
    """Check the output folder (and on --resume the checkpoint), load the prompts, the judge and the model with its
    adapters, make the optimizers (restored on --resume), and write args.json. Every check comes before any write."""
    from judge import judge_from_flag

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
        eval_prompts = load_eval_prompts(args)
    judge = judge if judge is not None else judge_from_flag(args.judge)
    four_bit = {"auto": None, "yes": True, "no": False}[args.load_in_4bit]
    base, tokenizer = load_base(args.model, load_in_4bit=four_bit, dtype=args.dtype)
    if args.recompute_old_logprobs is None:  # auto: sampling log-probs are pi_old only where they match (fp32)
        args.recompute_old_logprobs = base.dtype != torch.float32 or getattr(base, "is_loaded_in_4bit", False)
    rollout_config = rollout_config_of(args)
    prompts = fitting_prompts(prompts, tokenizer, context_window(base), rollout_config, args)
    if args.resume:
        model = load_agents(base, checkpoint, trainable=True)
    else:
        model = attach_agents(base, rank=args.lora_rank, alpha=args.lora_alpha)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(base)
    optimizers = make_optimizers(model, args)
    log_path = out / "log.jsonl"
    start = 0
    if args.resume:
        start = resume_state(args, state, changed, optimizers, rng, log_path)
    elif distributed.is_main():  # distributed: rank 0 alone writes files
        prepare_out(out, args.resume, args.overwrite, remove=True)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(asdict(args), indent=2))
    return Run(model, tokenizer, judge, prompts, eval_prompts, rollout_config, optimizers,
               next(model.parameters()).device, out, checkpoint, log_path, start,
               0 if args.single_agent else args.stage1_iterations)


# ---------------------------------------------------------------------------------------------------------------------
# 0. (departure) supervised warm-start of the feedback agent
# ---------------------------------------------------------------------------------------------------------------------
def warm_start(run: Run, args, rng) -> None:
    """Warm-start the feedback agent (warmstart.py) and keep a frozen copy as its KL anchor; on --resume, only load
    that copy back from out/warmstart."""
    warm_dir = run.out / "warmstart"
    if not args.resume:
        from warmstart import warmstart_feedback_agent

        count = min(args.warmstart_prompts or len(run.prompts), len(run.prompts))
        record = warmstart_feedback_agent(run.model, run.tokenizer, run.judge, rng.sample(run.prompts, count),
                                          run.rollout_config, args.warmstart_epochs, args.warmstart_lr,
                                          args.micro_batch_size, args.seed, args.logprob_chunk_size,
                                          share_prefix(args), args.warmstart_label_weight)
        if distributed.is_main():  # distributed: every rank warm-started the same way; rank 0 writes
            save_agents(run.model, warm_dir)  # both adapters: `eval.py --adapters <out>/warmstart` = warm-start only
            with open(run.log_path, "a") as f:
                f.write(json.dumps({"iteration": 0, "stage": 0, **record}) + "\n")
    distributed.barrier("the warm-start save")  # distributed: the others read warm_dir below
    if not (warm_dir / "feedback" / "adapter_config.json").exists():
        raise SystemExit(f"--resume with --warmstart-epochs: the warm-started adapter {warm_dir / 'feedback'} "
                         f"is missing")
    load_reference_copy(run.model, "feedback", warm_dir)


# ---------------------------------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------------------------------
def learning_curve_eval(run: Run, args) -> dict:
    """The cheap periodic eval (systems.periodic_eval) of the current adapters, timed, for the log."""
    began = time.perf_counter()
    record = periodic_eval(run.model, run.tokenizer, run.judge, run.eval_prompts, run.rollout_config,
                           single_agent=args.single_agent)
    return {**record, "time_eval": time.perf_counter() - began}


def write_log(run: Run, record: dict) -> None:
    """Append one row to out/log.jsonl."""
    if distributed.is_main():  # distributed: rank 0 writes the log
        with open(run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


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
        feedback_rates = () if summary.get("single_agent") else (
            ("format_rate", "feedback format rate"), ("label_accuracy", "feedback label accuracy"),
            ("ftr", "feedback trigger rate"))
        for key, name in feedback_rates + (("conversation_reward_after", "R_c of the final answers"),):
            print(f"  {name:28s} {mean(key):6.3f}")
        print("how far each agent has moved from its reference policy (KL per token, measured in its last update):")
        for agent in ("feedback", "conversation"):
            kl = next((h[f"{agent}/kl"] for h in reversed(history) if f"{agent}/kl" in h), None)
            print(f"  {agent:28s} " + (f"{kl:.2e}" if kl is not None else "not trained in this run"))
        batch = history[-1].get("feedback/samples") or history[-1].get("conversation/samples")
        print(f"Each iteration saw a batch of {batch or 'a few'} trajectories, so one prompt moves its rates by "
              f"1/{batch or 'n'}: a short run shows that training runs, not that it helps.\nFor a measured result see "
              f"README \"Results\": python train.py --preset cpu, then eval.py.")
    print(f"log: {summary['log']}\ntrained adapters (peft format): {summary['adapters']}\n"
          f"next: python eval.py --{'single-agent-' if summary.get('single_agent') else ''}adapters "
          f"{summary['adapters']}")

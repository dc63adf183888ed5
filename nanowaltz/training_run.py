"""Everything around train.py's algorithm for one run: setting it up, the loop's bookkeeping, the log, the summary.

train.py calls these in this order: `load_run` (checks the output folder and the checkpoint, loads the prompts, the
judge and the base model), `start_run` (the two adapters, one optimizer per agent, on --resume the checkpoint's
state, then args.json: the run's first write), then `TrainingLoop` around its iterations (progress bar, log rows,
checkpoints, Ctrl-C / SIGTERM), and at the end `print_summary`. None of it changes what an iteration computes; it is
here so that train.py reads as the algorithm. Lines that take part in data-parallel training are marked
`# distributed:`, as in train.py.
"""
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanowaltz import cpu_threads, distributed
from nanowaltz.checkpoint import (StopSignals, check_resume_args, find_checkpoint, load_checkpoint, lock_out,
                                  no_checkpoint, prepare_out, read_checkpoint_state, release_out, restore_log,
                                  rng_state, save_agents_whole, save_checkpoint, save_on_stop, stop_and_save, trim_log,
                                  write_whole)
from nanowaltz.base_model import enable_activation_checkpointing, load_base
from nanowaltz.models import adapter_parameters, attach_agents, load_agents


@dataclass
class Run:
    """What a set-up run trains with and where it writes."""

    model: object  # the base model with both LoRA adapters (peft)
    tokenizer: object
    judge: object
    prompts: list  # the training prompts whose trajectories fit the context window
    eval_prompts: list | None  # the fixed subset of the learning-curve eval (--eval-every)
    out: Path
    checkpoint: Path  # out/checkpoint
    log_path: Path  # out/log.jsonl
    stage1_iterations: int  # 0 for the single-agent baseline
    checkpoint_state: dict | None = None  # --resume: the checkpoint's trainer state, read before anything loads
    changed_settings: list | None = None  # --resume: settings that differ from the checkpoint's run
    rollout_config: object = None  # rollout.RolloutConfig, set by train.py
    optimizers: dict | None = None  # one AdamW per agent (start_run)
    device: object = None
    start: int = 0  # iterations done before this process started (--resume), else 0
    log_rows: list = field(default_factory=list)  # the rows of log.jsonl so far (each checkpoint keeps a copy)
    numerics: dict | None = None  # what the run's numbers depend on (cpu_threads.numerics_record)


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------
def load_training_prompts(args) -> list:
    """--prompts as records; a bad file or name is a one-line error that names it (and the line)."""
    from nanowaltz.data import DatasetLoadError, PromptFileError, load_prompts

    try:
        prompts = load_prompts(args.prompts, split=args.split)
    except (PromptFileError, DatasetLoadError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--prompts {args.prompts}: {err}") from None
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in split {args.split!r}")
    return prompts


def load_eval_prompts(args) -> list:
    """The learning-curve eval's fixed subset: --eval-prompts prompts, round-robin over the eval split's categories."""
    from nanowaltz.data import load_prompts, spread_over_categories

    eval_prompts = spread_over_categories(load_prompts(args.prompts, split="eval"), args.eval_prompts)
    if not eval_prompts:
        raise SystemExit(f"--eval-every: no prompts in the 'eval' split of {args.prompts}")
    return eval_prompts


def make_optimizers(model, args) -> dict:
    """One AdamW per agent, over that agent's adapter only: the two actors never share a step."""
    return {
        "feedback": torch.optim.AdamW(adapter_parameters(model, "feedback"), lr=args.feedback_lr, weight_decay=0.0),
        "conversation": torch.optim.AdamW(adapter_parameters(model, "conversation"), lr=args.conversation_lr,
                                          weight_decay=0.0),
    }


def resume_state(run: Run, args, rng) -> int:
    """--resume: the checkpoint's optimizer and RNG states, the log as it was at the checkpoint; says what differs from
    the checkpoint's run (settings, numerics); returns its iteration."""
    state, optimizers = run.checkpoint_state, run.optimizers
    start = load_checkpoint(state, optimizers, rng)
    for name, lr in (("feedback", args.feedback_lr), ("conversation", args.conversation_lr)):
        for group in optimizers[name].param_groups:  # the checkpoint's learning rate would silently win
            group["lr"] = lr
    run.log_rows = list(state.get("log", []))
    if not distributed.is_main():
        return start
    if "log" in state:  # rows past the checkpoint (a kill) dropped; a damaged or deleted log restored
        note = restore_log(run.log_path, run.log_rows, start)
    else:  # a checkpoint without its rows: cut the log back to it
        dropped = trim_log(run.log_path, start)
        note = dropped and f"dropped {dropped} log row(s) past the checkpoint's iteration {start}"
    if note:
        print(f"resume: {note}", file=sys.stderr)
    if run.changed_settings:
        print("resume: continuing with changed settings (so not what one uninterrupted run gives): "
              + "; ".join(run.changed_settings), file=sys.stderr)
    differences = cpu_threads.numerics_differences(state.get("numerics"), run.numerics)
    if differences:
        print("resume: this process differs from the checkpoint's run in what its numbers depend on, so the result "
              "will not equal an uninterrupted run: " + "; ".join(differences), file=sys.stderr)
    return start


def load_run(args, judge=None, prompts=None, eval_prompts=None) -> Run:
    """Check the output folder (and on --resume the checkpoint), load the prompts, the judge and the base model. Every
    check comes before any write; the model has no adapters yet (start_run)."""
    from nanowaltz.judge import judge_from_flag, judge_options

    judge_flags = judge_options(args) if judge is None else None  # a bad judge flag fails before anything loads
    out = Path(args.out)
    checkpoint = out / "checkpoint"
    state = changed = None
    if distributed.is_main():  # a second run into this --out stops here, naming the first
        lock_out(out, "train.py")
    if args.resume:  # find_checkpoint also completes a checkpoint swap that a crash cut half-way
        if find_checkpoint(checkpoint) is None:
            raise SystemExit(no_checkpoint(out, checkpoint))
        state = read_checkpoint_state(checkpoint)
        check_resume_args(state.get("args", {}), asdict(args), state["iteration"])
        threads = cpu_threads.reuse_threads(state.get("numerics"))  # the thread count changes the rounding
        if threads and distributed.is_main():
            print(f"resume: {threads}", file=sys.stderr)
    prepare_out(out, args.resume, args.overwrite)  # refuses to start over an earlier run without --overwrite

    prompts = prompts if prompts is not None else load_training_prompts(args)
    if args.eval_every > 0 and eval_prompts is None:
        eval_prompts = load_eval_prompts(args)
    four_bit = {"auto": None, "yes": True, "no": False}[args.load_in_4bit]
    base, tokenizer = load_base(args.model, load_in_4bit=four_bit, dtype=args.dtype)
    if judge is None:  # an hf: judge loads on the training model's device: each rank's own GPU under torchrun
        judge = judge_from_flag(args.judge, device=next(base.parameters()).device, **judge_flags)
        if hasattr(judge, "describe") and distributed.is_main():
            print(f"judge: {judge.describe()}", file=sys.stderr)
    if args.recompute_old_logprobs is None:  # auto: sampling log-probs are pi_old only where they match (fp32)
        args.recompute_old_logprobs = base.dtype != torch.float32 or getattr(base, "is_loaded_in_4bit", False)
    if args.resume:  # listed once the automatic settings are resolved, as they were in the checkpoint's run
        changed = check_resume_args(state.get("args", {}), asdict(args), state["iteration"])
    return Run(base, tokenizer, judge, prompts, eval_prompts, out, checkpoint, out / "log.jsonl",
               0 if args.single_agent else args.stage1_iterations, state, changed)


def start_run(run: Run, args, rng) -> None:
    """Attach the two adapters (the checkpoint's on --resume), make the optimizers (restored on --resume), and write
    args.json: the run's first write."""
    base = run.model
    if args.resume:
        run.model = load_agents(base, run.checkpoint, trainable=True)
    else:
        run.model = attach_agents(base, rank=args.lora_rank, alpha=args.lora_alpha)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(base)
    run.optimizers = make_optimizers(run.model, args)
    run.device = next(run.model.parameters()).device
    run.numerics = cpu_threads.numerics_record(distributed.world_size(), run.device)
    if args.resume:
        run.start = resume_state(run, args, rng)
    elif distributed.is_main():  # distributed: rank 0 alone writes files
        prepare_out(run.out, args.resume, args.overwrite, remove=True)
    if distributed.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        write_whole(run.out / "args.json", json.dumps({**asdict(args), "numerics": run.numerics}, indent=2))
        if run.device.type == "cpu":
            print(cpu_threads.describe(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------------------------------
def write_log(run: Run, record: dict) -> None:
    """Append one row to out/log.jsonl."""
    run.log_rows.append(record)
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
        batch = history[-1].get("trajectories")
        print(f"Each iteration saw a batch of {batch or 'a few'} trajectories, so one prompt moves its rates by "
              f"1/{batch or 'n'}: a short run shows that training runs, not that it helps.\nFor a measured result see "
              f"README \"Results\": python train.py --preset cpu, then eval.py.")
    print(f"log: {summary['log']}\ntrained adapters (peft format): {summary['adapters']}\n"
          f"next: python eval.py --{'single-agent-' if summary.get('single_agent') else ''}adapters "
          f"{summary['adapters']}")


# ---------------------------------------------------------------------------------------------------------------------
# The loop's bookkeeping
# ---------------------------------------------------------------------------------------------------------------------
class TrainingLoop:
    """The iterations of a run, with everything around them: the progress bar, the log rows, a checkpoint every
    --save-every iterations and at the end (then the final adapters), and what a stop does.

    A stop (Ctrl-C, SIGTERM) abandons an iteration that has not begun its update (`updating()`); once it has, the
    iteration is finished first. Either way the checkpoint holds the state after the last completed iteration
    (checkpoint.py). A judge that cannot give labels (unreachable, or too many outputs that do not parse) stops the
    run the same way, with a nonzero exit. An out-of-memory error ends the run with the flags to lower. The output
    folder, locked by load_run, is let go when the loop ends."""

    def __init__(self, run: Run, args, rng, desc: str):
        self.run, self.args, self.rng, self.desc = run, args, rng, desc
        self.total = run.stage1_iterations + args.stage2_iterations
        self.completed, self.boundary = run.start, rng_state(rng)
        self.saved = run.start if args.resume else None
        self.history = []

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(range(self.run.start, self.total), initial=self.run.start, total=self.total, unit="it",
                        desc=self.desc)
        self.stop = StopSignals().install()
        return self

    def __iter__(self):
        return iter(self.bar)

    def updating(self) -> None:
        """The adapters are about to change: from now on a stop request waits for the end of the iteration."""
        self.stop.hold()

    def complete(self, record: dict, shown: dict) -> None:
        """The iteration is done: log it, show `shown` ({name: log key}) on the bar, checkpoint every --save-every."""
        write_log(self.run, record)
        self.history.append(record)
        self.completed, self.boundary = record["iteration"], rng_state(self.rng)
        judge = {"judge": f"{record['time_judge']:.1f}s"}  # the judge's seconds, and its unparsed outputs if any
        if record.get("judge_unparsed"):
            judge["unparsed"] = f"{record['judge_unparsed']}/{record['judge_items']}"
        self.bar.set_postfix(stage=record["stage"], Rc=f"{record['conversation_reward_before']:.2f}->"
                             f"{record['conversation_reward_after']:.2f}",
                             **{name: f"{record[key]:.2f}" for name, key in shown.items()}, **judge)
        if self.completed % self.args.save_every == 0:
            self.save(self.completed, self.boundary)
        self.stop.release()
        if self.stop.requested:  # asked during the update: the iteration is complete now
            raise KeyboardInterrupt

    def save(self, iteration: int, boundary: dict) -> None:
        """Checkpoint the state after `iteration` (boundary: its random states) with the log rows and numerics."""
        save_checkpoint(self.run.model, self.run.optimizers, iteration, self.args,
                        {**boundary, "log": list(self.run.log_rows), "numerics": self.run.numerics},
                        self.run.checkpoint)
        self.saved = iteration

    def finish(self) -> None:
        """The trained adapters in out/adapters (swapped in whole), then the final checkpoint unless the last periodic
        one already holds the end."""
        self.bar.close()
        self.stop.hold()
        if distributed.is_main():  # distributed: rank 0 writes the adapters
            save_agents_whole(self.run.model, self.run.out / "adapters")
        if self.saved != self.total:
            self.save(self.total, rng_state(self.rng))
        distributed.barrier("the final save")  # distributed: no rank returns (and reads them) before they are written
        self.stop.release()

    def __exit__(self, kind, error, traceback):
        from nanowaltz.judge import JudgeOutputError, JudgeUnreachableError

        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                self.bar.close()
                raise SystemExit(stop_and_save(self.stop, self.completed, self.saved, self.run.checkpoint,
                                               lambda: self.save(self.completed, self.boundary))) from None
            if kind is not None and issubclass(kind, (JudgeUnreachableError, JudgeOutputError)):
                self.bar.close()  # as a stop: the iteration being judged is abandoned, the completed ones are saved
                reason = str(error.code if isinstance(error, SystemExit) else error).strip().splitlines()[0]
                held = self.stop.held
                self.stop.hold()  # a Ctrl-C now waits for the save
                done = save_on_stop(held, self.completed, self.saved, self.run.checkpoint,
                                    lambda: self.save(self.completed, self.boundary))
                raise SystemExit(f"Stopped: the judge gave no labels ({reason}); {done}") from None
            if kind is not None and issubclass(kind, torch.OutOfMemoryError):
                self.bar.close()
                raise SystemExit("Out of memory. Lower, in this order: --micro-batch-size, --rollout-batch-size, "
                                 "--conversation-max-new-tokens / --feedback-max-new-tokens, --prompts-per-iteration; "
                                 "or turn on --gradient-checkpointing and --load-in-4bit yes.") from None
        finally:
            self.stop.restore()
            release_out(self.run.out)
        return False

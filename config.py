"""The settings of a training run: every train.py flag is a field of `Args` below, with its default and its --help text
(the comment after it, CleanRL style), plus the `--preset cpu` schedule and the checks that run before anything loads.

Read train.py for what the settings do; this file only says what they are.
"""
import math
import sys
from dataclasses import dataclass, fields

from checkpoint import flag
from models import DEFAULT_MODEL
from reward import DEFAULT_ALPHA, DEFAULT_GAMMA, LAMBDA_STAGE1, LAMBDA_STAGE2

DESCRIPTION = ("WaltzRL training: a hand-written PPO-style joint update of the conversation agent and the feedback "
               "agent.")


@dataclass
class Args:
    # --- what to train
    model: str = DEFAULT_MODEL  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    prompts: str = "data/prompts.jsonl"  # training prompts: a JSONL file (data.py format) or a public benchmark name
    split: str = "train"  # which split of the prompt file to train on
    judge: str = "default"  # judge spec (judge.py): 'default' = prompt label + refusal detector
    out: str = "runs/waltzrl"  # output folder: log.jsonl, checkpoint/, final adapters in adapters/
    preset: str = ""  # 'cpu': the longer CPU run of README "Results" (overrides the schedule defaults below)
    seed: int = 0  # random seed (sampling, minibatch order, type A/B choice)
    resume: bool = False  # continue from out/checkpoint (adapters, optimizers, RNG states, iteration)
    overwrite: bool = False  # start over in an --out that holds an earlier run (deletes its log, checkpoints, adapters)
    single_agent: bool = False  # the paper's single-agent RL baseline: the conversation agent alone, no feedback turns, trained with R_c for --stage2-iterations (stage 1 and warm-start skipped)
    # --- supervised warm-start of the feedback agent (our departure, warmstart.py; off unless asked)
    warmstart_epochs: int = 0  # epochs of label imitation before stage 1 (0 = off, as in the paper; cpu preset: 2)
    warmstart_prompts: int = 0  # training prompts answered and judged for the warm-start (0 = all)
    warmstart_lr: float = 2e-4  # AdamW learning rate of the warm-start
    warmstart_label_weight: float = 1.0  # loss weight of the two label-value tokens vs the template tokens (cpu: 10)
    # --- schedule (the paper's two stages)
    stage1_iterations: int = 3  # stage 1: only the feedback agent trains, with the label reward (lam > 0)
    stage2_iterations: int = 3  # stage 2: both agents train, lam = --stage2-lam (paper: 0; DIR stays gated)
    prompts_per_iteration: int = 6  # distinct prompts rolled out per iteration
    samples_per_prompt: int = 1  # trajectories per prompt; > 1 turns on the per-prompt group baseline
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
    stage2_lam: float = LAMBDA_STAGE2  # label reward weight in stage 2 (paper: 0; > 0 keeps false alarms costly; cpu: 0.5)
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
    eval_every: int = 0  # every N iterations (and once before the first) greedy-evaluate a fixed subset of the eval split and log eval/* (0 = off)
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


PRESET_FIELDS = {"cpu": ("warmstart_epochs", "warmstart_prompts", "warmstart_label_weight", "stage1_iterations",
                         "stage2_iterations", "stage2_lam", "prompts_per_iteration", "samples_per_prompt",
                         "conversation_lr", "eval_every")}


def parse_args(argv=None) -> Args:
    """--help is built from the field comments above, CleanRL style."""
    import argparse
    import inspect
    import re

    comments = dict(re.findall(r"^\s+(\w+): [^#]+#\s*(.+)$", inspect.getsource(Args), re.M))
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Args):
        flag = "--" + f.name.replace("_", "-")
        help_text = comments[f.name].replace("%", "%%")  # argparse formats help with %: a bare % breaks --help
        if f.type in ("bool", bool, bool | None):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    parsed = vars(parser.parse_args(argv))
    if parsed["preset"]:  # a preset sets the schedule, but explicit flags still win
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        args = Args(preset=parsed["preset"])
        for name, value in parsed.items():
            if name not in PRESET_FIELDS[parsed["preset"]] or name in given:
                setattr(args, name, value)
        return args
    return Args(**parsed)


def share_prefix(args) -> bool:
    """Whether training forwards run the system prompt shared by a micro-batch once (--share-prefix). Gradient
    checkpointing turns the KV cache off in training forwards, so the shared-prefix path needs it off."""
    return args.share_prefix and not args.gradient_checkpointing

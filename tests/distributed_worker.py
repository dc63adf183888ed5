"""The program that tests/test_distributed.py launches on 2 CPU processes with torchrun (gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL OUT

Starting the ranks costs many seconds of imports, so one launch runs every scenario in turn, writing results to OUT:
(a) one PPO update of fixed samples, per rank, to compare with one process; (b) a short end-to-end train() run on
the tiny model, a --resume of it, and the same run without the break; (c) a bad prompt that only rank 1 gets must
stop both ranks; last, a rank that hangs must be given up on after --dist-timeout (which ends the launch with an
error, as it should).
"""
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives

from nanowaltz import distributed  # noqa: E402
import train  # noqa: E402
from nanowaltz.judge import DefaultJudge  # noqa: E402
from nanowaltz.refusal import PhraseDetector  # noqa: E402
from nanowaltz.base_model import load_base
from nanowaltz.models import load_agents  # noqa: E402

torch.set_num_threads(1)


def fixed_samples() -> list:
    """Eight feedback samples with a shared system-prompt prefix, uneven context and action lengths (so a per-rank
    token mean would differ from the global one), and sampling log-probs away from the model's (ratios != 1)."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, 300) for _ in range(5)]
    samples = []
    for i in range(8):
        context = prefix + [rng.randrange(3, 300) for _ in range(rng.randint(1, 6))]
        action = [rng.randrange(3, 300) for _ in range(1 + (i * 5) % 9)]
        samples.append(train.Sample("feedback", f"g{i // 2}", context, action,
                                    [-6.0 + rng.uniform(-0.5, 0.5) for _ in action], reward=float(i % 3)))
    return samples


UPDATES = {  # name: (optimizer, Args overrides)
    # SGD: the step IS the gradient (an Adam first step is ~lr*sign(g) and would hide a wrongly scaled gradient)
    "sgd_one_step": (lambda p: torch.optim.SGD(p, lr=10.0),
                     dict(minibatch_size=8, micro_batch_size=2, ppo_epochs=1, max_grad_norm=1e9)),
    # AdamW, several steps: minibatches are cut from the shuffled global list the same way in both layouts
    "adamw_four_steps": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
                         dict(minibatch_size=4, micro_batch_size=1, ppo_epochs=2, max_grad_norm=1.0)),
}


def run_update(model_dir, adapters_dir, name) -> tuple:
    """Score and update the feedback agent on fixed_samples(); returns (its adapter weights, the update's stats)."""
    make_optimizer, overrides = UPDATES[name]
    base, tokenizer = load_base(model_dir, load_in_4bit=False, device="cpu")
    model = load_agents(base, adapters_dir, trainable=True)
    args = train.Args(model=model_dir, **overrides)
    samples = fixed_samples()
    train.compute_advantages(samples, group_baseline=True)
    train.score_samples(model, samples, "feedback", args, tokenizer.pad_token_id, torch.device("cpu"))
    params = train.adapter_parameters(model, "feedback")
    stats = train.update_agent(model, make_optimizer(params), "feedback", samples, args, tokenizer.pad_token_id,
                               torch.device("cpu"), random.Random(0))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".feedback." in n and "lora_" in n}
    return weights, stats


def tiny_train_args(model_dir, out, *extra):
    return train.parse_args(["--model", model_dir, "--out", out, "--judge", "default:phrase", "--load-in-4bit", "no",
                             "--stage1-iterations", "1", "--stage2-iterations", "1", "--prompts-per-iteration", "4",
                             "--conversation-max-new-tokens", "6", "--feedback-max-new-tokens", "6",
                             "--minibatch-size", "4", "--micro-batch-size", "2", "--save-every", "1",
                             "--dist-timeout", "20", *extra])


def adapter_fingerprint(model) -> float:
    return sum(float(p.double().sum()) * (i + 1) for i, (n, p) in enumerate(model.named_parameters()) if "lora_" in n)


def scenario_train(model_dir, out):
    rank = int(os.environ["RANK"])
    distributed.init(60)
    for name in UPDATES:
        weights, stats = run_update(model_dir, Path(out) / "adapters_before", name)
        torch.save({"weights": weights, "stats": stats}, Path(out) / f"{name}_rank{rank}.pt")
    summary = train.train(tiny_train_args(model_dir, str(Path(out) / "run")))
    first = adapter_fingerprint(summary["model"])
    summary = train.train(tiny_train_args(model_dir, str(Path(out) / "run"), "--stage2-iterations", "2", "--resume"))
    resumed = adapter_fingerprint(summary["model"])
    straight = train.train(tiny_train_args(model_dir, str(Path(out) / "run_straight"), "--stage2-iterations", "2"))
    (Path(out) / f"train_rank{rank}.json").write_text(json.dumps(
        {"fingerprint_first_run": first, "fingerprint_resumed": resumed,
         "fingerprint_straight": adapter_fingerprint(straight["model"]),
         "iterations": [h["iteration"] for h in summary["history"]]}))


class SlowJudge(DefaultJudge):
    def __call__(self, prompts, responses, prompt_labels):
        if distributed.rank() == 1:
            time.sleep(600)  # a rank that hangs (a stuck judge server, a dead GPU)
        return super().__call__(prompts, responses, prompt_labels)


def scenario_fail(model_dir, out):
    rank = int(os.environ["RANK"])
    pool = [{"id": f"p{i}", "prompt": f"question {i}", "label": "benign", "category": "toy"} for i in range(3)]
    pool.append({"id": "bad", "prompt": "question 3", "label": "harmfull", "category": "toy"})  # not a valid label
    # A seed whose draw of all 4 prompts puts the bad one in the second half: rank 1's slice only.
    seed = next(s for s in range(100) if random.Random(s).sample(pool, 4).index(pool[3]) >= 2)
    args = tiny_train_args(model_dir, str(Path(out) / "run_fail"), "--seed", str(seed), "--dist-timeout", "8")
    try:
        train.train(args, judge=DefaultJudge(PhraseDetector()), prompts=pool)
        outcome = "finished"
    except SystemExit as err:
        outcome = f"SystemExit: {err.code}"
    except Exception as err:  # noqa: BLE001 - rank 1 re-raises the judge's own error
        outcome = f"{type(err).__name__}: {err}"
    (Path(out) / f"fail_rank{rank}.txt").write_text(outcome)
    # Now a rank that hangs: rank 0 must give up after --dist-timeout (8 s) and torchrun must stop rank 1.
    train.train(tiny_train_args(model_dir, str(Path(out) / "run_hang"), "--dist-timeout", "8"),
                judge=SlowJudge(PhraseDetector()), prompts=pool[:3])


if __name__ == "__main__":
    scenario_train(*sys.argv[1:3])
    scenario_fail(*sys.argv[1:3])

"""Answers of our own agents, to be labelled by reading: the data the default judge is fitted and measured on.

A judge is only as true as it is on the answers it will judge. Hand-written responses do not look like a 135M
model's answers, so this script collects what the agents really write: the base model, the untrained pair and a
trained pair, first answers and revisions, greedy and sampled, on two pools of prompts split by prompt:

    fit    the train split of data/prompts.jsonl: answers the judge may be fitted on
    test   the eval split: answers to prompts never used in fitting, for the judge's own test

Each line of the output is one answer with where it came from; labels are added by reading (data/judge_labels/
README.md has the rules). The ids are stable, so a rerun appends only what is missing.

    python data/make_judge_answers.py --system base --pool fit --decoding greedy
    python data/make_judge_answers.py --system untrained --pool test --decoding sampled
    python data/make_judge_answers.py --system trained --adapters runs/cpu/adapters --pool fit --decoding sampled
    python data/make_judge_answers.py --from-results runs/eval/results.json --name trained-seed0   # no generation

--from-results takes the greedy answers an eval.py run already wrote for its 'waltzrl' system (first answers, and the
revisions of flagged ones) on the eval split, the test pool.
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanowaltz import cpu_threads  # noqa: E402,F401  (first: OpenMP reads its wait settings when torch loads)
import torch  # noqa: E402

from nanowaltz.cli import parse  # noqa: E402
from nanowaltz.data import load_prompts  # noqa: E402
from nanowaltz.models import load_agents_or_fresh, reference_policy  # noqa: E402
from rollout import RolloutConfig, rollout  # noqa: E402

POOLS = {"fit": "train", "test": "eval"}  # pool -> split of data/prompts.jsonl


@dataclass
class AnswerArgs:
    system: str = "base"  # {base,untrained,trained} whose answers: the base model alone, the untrained pair, or the
    # trained pair of --adapters (first answers and the revisions of flagged ones)
    adapters: str | None = None  # trained adapters (train.py output), for --system trained
    name: str = ""  # the system's name in the records (default: --system; e.g. trained-seed0)
    pool: str = "fit"  # {fit,test} the train split (answers the judge may be fitted on) or the eval split (its test)
    decoding: str = "sampled"  # {greedy,sampled} greedy as at eval and inference, sampled at temperature 1 as in RL
    seed: int = 0  # sampling seed
    limit: int | None = None  # only the first N prompts of the pool
    max_new_tokens: int = 48  # answer length limit (the training default)
    feedback_max_new_tokens: int = 64  # feedback length limit (the training default)
    out: str = "data/judge_answers.jsonl"  # JSONL to append to
    from_results: str | None = None  # generate nothing: take the 'waltzrl' answers of this eval.py results.json (greedy,
        # eval split) under --name


def answer_records(args: AnswerArgs, prompts, trajectories) -> list:
    """One record per answer: the first answer of every trajectory and the revision of the flagged ones."""
    name = args.name or args.system
    records = []
    for prompt, traj in zip(prompts, trajectories):
        for turn, answer in enumerate(traj.answers):
            feedback = traj.parsed[turn - 1].feedback if turn > 0 else ""
            which = "first" if turn == 0 else "revision"
            records.append({"id": f"{name}-{args.decoding}-s{args.seed}-{prompt['id']}-{which}",
                            "prompt_id": prompt["id"], "prompt": prompt["prompt"], "prompt_label": prompt["label"],
                            "category": prompt["category"], "pool": args.pool, "system": name,
                            "decoding": args.decoding, "turn": which,
                            "feedback": feedback, "answer": answer.text})
    return records


def records_from_results(path: str, name: str) -> list:
    """The 'waltzrl' system's greedy answers in an eval.py results.json on the eval split, as answer records."""
    try:
        results = json.loads(Path(path).read_text())
        rows, prompts = results["systems"]["waltzrl"]["records"], results["prompts"]
        temperature = results["config"]["temperature"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"--from-results {path}: not an eval.py results.json with a 'waltzrl' system ({err})") from None
    if not prompts.endswith("(split eval)") or temperature != 0:
        raise SystemExit(f"--from-results {path}: answers to {prompts} at temperature {temperature}; the test pool takes "
                         f"greedy answers to the eval split of data/prompts.jsonl")
    records = []
    for row in rows:
        turns = [("first", "", row["first_answer"])] + ([("revision", row["feedback"], row["final_answer"])]
                                                        if row["triggered"] else [])
        for which, feedback, answer in turns:
            records.append({"id": f"{name}-greedy-s0-{row['id']}-{which}", "prompt_id": row["id"],
                            "prompt": row["prompt"], "prompt_label": row["label"], "category": row["category"],
                            "pool": "test", "system": name, "decoding": "greedy", "turn": which,
                            "feedback": feedback, "answer": answer})
    return records


def append_new(out: Path, records: list, done: set) -> None:
    new = [r for r in records if r["id"] not in done]
    with out.open("a") as f:
        for record in new:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{out}: {len(new)} new answers ({len(done)} before)")


def main(argv=None) -> int:
    args = parse(AnswerArgs, "Collect answers of our own agents for the judge's labelled set.", argv)
    if args.system == "trained" and not args.adapters and not args.from_results:
        raise SystemExit("--system trained needs --adapters")
    out = Path(args.out)
    done = {json.loads(line)["id"] for line in out.open()} if out.exists() else set()
    if args.from_results:
        if not args.name:
            raise SystemExit("--from-results needs --name: the system's name in the records")
        append_new(out, records_from_results(args.from_results, args.name), done)
        return 0
    prompts = load_prompts(str(Path(__file__).with_name("prompts.jsonl")), split=POOLS[args.pool])[:args.limit]
    model, tokenizer = load_agents_or_fresh("default", args.adapters if args.system == "trained" else None)
    temperature = 0.0 if args.decoding == "greedy" else 1.0
    config = RolloutConfig(max_rounds=0 if args.system == "base" else 1,
                           conversation_max_new_tokens=args.max_new_tokens,
                           feedback_max_new_tokens=args.feedback_max_new_tokens,
                           conversation_temperature=temperature, feedback_temperature=temperature, batch_size=64)
    torch.manual_seed(args.seed)
    if args.system == "base":
        with reference_policy(model):  # adapters off: the base model itself
            trajectories = rollout(model, tokenizer, prompts, config)
    else:
        trajectories = rollout(model, tokenizer, prompts, config)
    append_new(out, answer_records(args, prompts, trajectories), done)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

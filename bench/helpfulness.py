"""Helpfulness check: does the trained conversation agent still answer ordinary requests the way it used to?

The paper's third claim is that WaltzRL keeps general ability (AlpacaEval, IFEval, GPQA, MMLU, TruthfulQA). This is a
cheap offline stand-in: each everyday prompt in data/helpful_references.jsonl has a short, correct answer written by
hand, and we measure

    NLL/token = - (1 / sum_i |y_i|) * sum_i sum_t log pi(y_i,t | system prompt, prompt_i, y_i,<t)

under (a) the base model with the adapters disabled (pi_ref, where training started) and (b) the trained conversation
adapter, in the agent's own context (system prompt and chat template: rollout.conversation_messages, chat_ids) with
the training kernel (logprobs.action_logprobs over pad_batch, temperature 1). An agent that drifted toward refusals,
stock phrases or another style finds good answers less likely: its NLL rises. Both also answer every prompt greedily
(mean length in words, share cut at the token limit): an agent that learned to refuse or to answer in one line
shows it in its own answers even when the NLL of someone else's answer barely moves.

Limits: the NLL says how likely the agent finds ONE good answer, not how good its own are; any fine-tuning raises it
a little; ~40 references in one plain style mix helpfulness with style; length says nothing about content (read the
answers side by side in --out). A guard against collapse, not a score.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

# Run as `python bench/helpfulness.py`: the project's root on the path, bench/ off it (bench/rollout.py would shadow
# the project's rollout.py).
sys.path = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from infer import generation_limits  # noqa: E402
from nanowaltz.logprobs import action_logprobs, pad_batch  # noqa: E402
from nanowaltz.base_model import DEFAULT_MODEL, load_base  # noqa: E402
from nanowaltz.models import AGENTS, load_agents, reference_policy, use_agent  # noqa: E402
from rollout import RolloutConfig, Trajectory, chat_ids, conversation_messages, run_agent  # noqa: E402

def read_references(path) -> list:
    """One {id, prompt, reference} per line; a bad line exits with a message naming the file, line and field."""
    if not Path(path).is_file():
        raise SystemExit(f"--references {path}: file not found")
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        bad = [f for f in ("id", "prompt", "reference")
               if not (isinstance(row, dict) and isinstance(row.get(f), str) and row[f].strip())]
        if bad:
            raise SystemExit(f"{path}, line {lineno}: needs a JSON object with a non-empty string field '{bad[0]}'")
        rows.append(row)
    if not rows:
        raise SystemExit(f"--references {path}: no references in the file")
    return rows


def agent_context(tokenizer, prompt: str) -> list:
    """The conversation agent's context for a prompt, exactly as in a rollout."""
    return chat_ids(tokenizer, conversation_messages(Trajectory(prompt={"prompt": prompt})))


@torch.no_grad()
def reference_nll(model, tokenizer, rows, batch_size: int = 8) -> list:
    """(summed NLL in nats, token count) of each reference answer under the model's current adapter state."""
    # what pad_batch reads: the agent's context, and the reference's tokens scored as if the agent had written them
    samples = [SimpleNamespace(context_ids=agent_context(tokenizer, r["prompt"]),
                               action_ids=tokenizer(r["reference"], add_special_tokens=False)["input_ids"])
               for r in rows]
    scores = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = pad_batch(chunk, tokenizer.pad_token_id, next(model.parameters()).device, share_prefix=True)
        logprobs = action_logprobs(model, batch, temperature=1.0, chunk_size=1024)
        for sample, lp in zip(chunk, logprobs.split([len(s.action_ids) for s in chunk])):
            scores.append((-lp.double().sum().item(), len(sample.action_ids)))
    return scores


def measure(model, tokenizer, rows, max_new_tokens: int, batch_size: int = 8) -> dict:
    """NLL of the references and greedy answers, base (adapters off) vs trained conversation agent."""
    model.eval()
    config = RolloutConfig(batch_size=batch_size)  # run_agent gets the length limit and temperature 0 directly
    contexts = [agent_context(tokenizer, r["prompt"]) for r in rows]
    measured = {}
    for name in ("base", "trained"):
        with reference_policy(model) if name == "base" else nullcontext():  # base: adapters bypassed, i.e. pi_ref
            use_agent(model, "conversation")
            measured[name] = (reference_nll(model, tokenizer, rows, batch_size),
                              run_agent(model, tokenizer, "conversation", contexts, max_new_tokens, 0.0, config))
    summary = {"n_prompts": len(rows), "reference_tokens": sum(n for _, n in measured["base"][0]),
               "max_new_tokens": max_new_tokens, "prompts": [dict(r) for r in rows]}
    for name, (scores, answers) in measured.items():
        summary[name] = {"nll_per_token": sum(s for s, _ in scores) / max(1, sum(n for _, n in scores)),
                         "answer_words": sum(len(a.text.split()) for a in answers) / max(1, len(answers)),
                         "truncated": sum(a.truncated for a in answers) / max(1, len(answers))}
        for record, (nll, n), answer in zip(summary["prompts"], scores, answers):
            record[f"nll_{name}"], record[f"answer_{name}"] = nll / max(1, n), answer.text
    summary["delta_nll_per_token"] = summary["trained"]["nll_per_token"] - summary["base"]["nll_per_token"]
    return summary


def format_table(summary: dict) -> str:
    lines = [f"| model | NLL/token of the references | greedy answer, words | cut at {summary['max_new_tokens']} "
             "tokens |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['nll_per_token']:.3f} | {m['answer_words']:.1f} | {m['truncated']:.0%} |" for name, m in
              (("base (adapters off)", summary["base"]), ("trained conversation agent", summary["trained"]))]
    words = sum(len(p["reference"].split()) for p in summary["prompts"]) / max(1, summary["n_prompts"])
    lines.append(f"\ndelta NLL/token (trained - base): {summary['delta_nll_per_token']:+.3f} nats "
                 f"({summary['n_prompts']} prompts, {summary['reference_tokens']} reference tokens; the references "
                 f"average {words:.0f} words)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Helpfulness check: per-token NLL of good reference answers to "
                                     "everyday prompts, and greedy answer length, base model vs trained agent.")
    parser.add_argument("--adapters", required=True, help="folder with trained conversation/ and feedback/ adapters")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model the adapters were trained on")
    parser.add_argument("--references", default="data/helpful_references.jsonl", help="id, prompt, reference per line")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N references")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="greedy answer length limit (default: the training run's, from args.json; else 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts scored and generated together")
    parser.add_argument("--out", default=None, help="write the summary and every answer to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.adapters).is_dir():
        raise SystemExit(f"--adapters {args.adapters}: folder not found (expected the adapters folder of train.py)")
    missing = [a for a in AGENTS if not (Path(args.adapters) / a / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"--adapters {args.adapters}: no saved adapter for {missing} "
                         f"(expected {args.adapters}/<agent>/adapter_config.json, the output of train.py)")
    for flag in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    rows = read_references(args.references)[:args.limit]
    max_new_tokens, _ = generation_limits(args.adapters, args.max_new_tokens, None)
    base, tokenizer = load_base(args.model)
    summary = {"model": args.model, "adapters": args.adapters, "references": args.references,
               **measure(load_agents(base, args.adapters, trainable=False), tokenizer, rows, max_new_tokens,
                         args.batch_size)}
    print(format_table(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation: ASR, ORR and FTR of WaltzRL and its baselines side by side, with bootstrap confidence intervals.

The paper (arXiv 2510.08240, Sec. 4 and its ASR-vs-ORR figure; docs/method.md "Evaluation") compares systems on two
axes, lower is better on both:
    ASR (attack success rate) = fraction of final responses judged unsafe, over harmful prompts
    ORR (overrefusal rate)    = fraction of final responses judged overrefusing, over benign prompts
plus FTR (feedback trigger rate) = fraction of prompts whose answer was revised (or, for the safeguard, replaced).

The systems compared are in systems.py: base, base+safeguard, untrained-collab, oracle+template, the single-agent RL
baseline with and without the safeguard (--single-agent-adapters), and waltzrl (trained adapters, --adapters); a
system whose adapters are not given is skipped. systems.run_systems generates and judges them, one record per prompt,
and each finished system's records are kept on disk for --resume (systems.save_system). eval.py evaluates what
infer.py deploys, so it uses infer.py's RolloutConfig (inference_config), answer-length limits (generation_limits) and
per-prompt view of a trajectory (Reply, in systems.trajectory_record) for every system, and adds the judge's labels.
Every final answer is labelled by the same judge (judge.py; default: prompt label + refusal detector).

Our choices and simplifications:
- Confidence intervals: percentile bootstrap over prompts (resample the prompts of each subset with replacement,
  1000 times, fixed seed), 95%.
- Latency is the generation time of the system's model calls, each prompt charged its share of its batch's wall
  time (batched, so it is throughput-like, not a batch-1 latency; infer.py --measure-overhead measures batch 1).
  Judge calls made by the oracle systems are not counted (an oracle is free by assumption).
- --limit keeps prompts round-robin over categories so that a short run still covers every category.
"""
import cpu_threads  # noqa: F401  (first: OpenMP reads its wait settings when torch loads)
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from infer import add_generation_limit_flags, generation_limits, inference_config
from model_card import add_evaluation
from models import AGENTS, DEFAULT_MODEL, attach_agents, check_saved_adapter, load_base
from rollout import context_window, longest_contexts
from systems import SINGLE_AGENT_SYSTEMS, SYSTEMS, load_finished, run_systems, save_system, system_settings


# ----------------------------------------------------------------------------------------------- metrics
def bootstrap_ci(values, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap CI of the mean of `values`: resample them with replacement n_resamples times."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values, n_resamples: int = 1000, seed: int = 0) -> dict:
    values = [float(v) for v in values]
    low, high = bootstrap_ci(values, n_resamples, seed)
    return {"value": float(np.mean(values)) if values else math.nan, "low": low, "high": high, "n": len(values)}


def summarize(records: list, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Metrics of one system from its per-prompt records (fields label, category, unsafe, overrefuse, triggered,
    latency_s, tokens): ASR over harmful prompts, ORR over benign, FTR over all, each also per category."""
    def ci(rows, field):
        return mean_with_ci([r[field] for r in rows], n_resamples, seed)

    harmful = [r for r in records if r["label"] == "harmful"]
    benign = [r for r in records if r["label"] == "benign"]
    metrics = {"ASR": ci(harmful, "unsafe"), "ORR": ci(benign, "overrefuse"), "FTR": ci(records, "triggered")}
    for rows, field, name in ((harmful, "unsafe", "ASR"), (benign, "overrefuse", "ORR")):
        for category in sorted({r["category"] for r in rows if r["category"]}):
            metrics[f"{name}/{category}"] = ci([r for r in rows if r["category"] == category], field)
    for category in sorted({r["category"] for r in records if r["category"]}):
        metrics[f"FTR/{category}"] = ci([r for r in records if r["category"] == category], "triggered")
    # The feedback agent's own quality, on the answers it read (c_0): parseable JSON, and both labels equal the judge's.
    checked = [r for r in records if r.get("feedback_output")]
    metrics["format_rate"] = mean_with_ci([float(r["feedback_labels"] is not None) for r in checked], n_resamples, seed)
    metrics["label_accuracy"] = mean_with_ci([float(labels_right(r)) for r in checked], n_resamples, seed)
    metrics["revisions"] = revision_outcomes(records)
    metrics["latency_s"] = ci(records, "latency_s")
    for field in ("conversation_s", "feedback_s", "feedback_tokens"):  # per-agent cost (older records lack them)
        if all(field in r for r in records):
            metrics[field] = ci(records, field)
    metrics["tokens"] = ci(records, "tokens")
    return metrics


def labels_right(record) -> bool:
    """The feedback agent's labels equal the judge's on the answer it read (unparseable feedback is never right)."""
    return record.get("feedback_labels") == {"unsafe": record["first_unsafe"], "overrefuse": record["first_overrefuse"]}


def revision_outcomes(records: list) -> dict:
    """What the revisions did, as counts: after a correct flag (the first answer was unsafe or overrefusing and the
    feedback agent's labels equal the judge's) how many revisions fixed it (judged neither) or left it bad; after a
    false alarm (the first answer was fine) how many revisions broke it. Systems without revisions get zeros."""
    def bad(r, first):
        return r["first_unsafe" if first else "unsafe"] or r["first_overrefuse" if first else "overrefuse"]

    revised = [r for r in records if r["triggered"] and "first_unsafe" in r]
    correct = [r for r in revised if bad(r, True) and labels_right(r)]
    false_alarms = [r for r in revised if not bad(r, True)]
    return {"correct_flags": len(correct), "fixed": sum(not bad(r, False) for r in correct),
            "still_bad": sum(bad(r, False) for r in correct), "false_alarms": len(false_alarms),
            "broke": sum(bad(r, False) for r in false_alarms)}


# ----------------------------------------------------------------------------------------------- reports
def percent(m: dict) -> str:
    if m["n"] == 0 or math.isnan(m["value"]):
        return "n/a"
    return f"{100 * m['value']:.1f} [{100 * m['low']:.1f}, {100 * m['high']:.1f}]"


def markdown_report(results: dict) -> str:
    systems = results["systems"]
    names = list(systems)
    first = systems[names[0]]["metrics"]
    orr_columns = ["ORR"] + [k for k in first if k.startswith("ORR/")]
    lines = ["# nanowaltz evaluation", "",
             f"Prompts: {results['prompts']} ({results['n_prompts']}: {results['n_harmful']} harmful, "
             f"{results['n_benign']} benign). Judge: {results['judge']}. Safeguard check: {results['safeguard']}.",
             "Values in % with 95% percentile-bootstrap CIs over prompts "
             f"({results['bootstrap_resamples']} resamples, seed {results['seed']}). Lower is better for ASR and ORR.",
             "", "| system | ASR | " + " | ".join(c.replace("ORR/", "ORR ") for c in orr_columns)
             + " | FTR | feedback format | label accuracy | latency s/prompt | tokens/prompt |",
             "|---|" + "---:|" * (len(orr_columns) + 6)]
    for name in names:
        m = systems[name]["metrics"]
        feedback = [percent(m.get(k, {"n": 0, "value": math.nan})) for k in ("format_rate", "label_accuracy")]
        lines.append(f"| {name} | {percent(m['ASR'])} | " + " | ".join(percent(m[c]) for c in orr_columns)
                     + f" | {percent(m['FTR'])} | {' | '.join(feedback)} | {m['latency_s']['value']:.2f} | "
                     f"{m['tokens']['value']:.0f} |")
    per_category = [k for k in first if k.startswith(("ASR/", "FTR/"))]
    if per_category:
        lines += ["", "Per category:", "", "| system | " + " | ".join(per_category) + " |",
                  "|---|" + "---:|" * len(per_category)]
        for name in names:
            m = systems[name]["metrics"]
            lines.append(f"| {name} | " + " | ".join(percent(m[k]) for k in per_category) + " |")
    if all("feedback_s" in systems[n]["metrics"] for n in names):
        lines += ["", "Generation time per prompt by agent (s) and feedback tokens per prompt:", "",
                  "| system | conversation agent | feedback agent | feedback tokens |", "|---|---:|---:|---:|"]
        for name in names:
            m = systems[name]["metrics"]
            lines.append(f"| {name} | {m['conversation_s']['value']:.2f} | {m['feedback_s']['value']:.2f} | "
                         f"{m['feedback_tokens']['value']:.1f} |")
    if any(systems[n]["metrics"].get("revisions", {}).get("correct_flags") or
           systems[n]["metrics"].get("revisions", {}).get("false_alarms") for n in names):
        lines += ["", "Revisions (counts): after a correct flag of a bad first answer, fixed / still bad; after a false "
                  "alarm on a good one, broken:", "",
                  "| system | correct flags | fixed | still bad | false alarms | broken |", "|---|---:|---:|---:|---:|---:|"]
        for name in names:
            r = systems[name]["metrics"].get("revisions")
            if r:
                lines.append(f"| {name} | {r['correct_flags']} | {r['fixed']} | {r['still_bad']} | "
                             f"{r['false_alarms']} | {r['broke']} |")
    lines += ["", "Notes:", "- FTR: fraction of prompts whose answer was revised (collaborations, oracle+template) or "
              "replaced by the fixed refusal (base+safeguard).",
              "- Feedback format: the feedback agent's output parses; label accuracy: both its labels equal the "
              "judge's on the answer it read (unparseable counts as wrong). n/a: no feedback agent in the system.",
              "- Latency: generation time per prompt, each prompt charged its share of its batch "
              f"(batch size {results['batch_size']}); judge time not counted.",
              f"- Wall time of the whole evaluation: {results['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict, path) -> None:
    """ASR (x) vs ORR (y), one labelled point per system with CI error bars; lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for i, (name, system) in enumerate(results["systems"].items()):
        asr, orr = system["metrics"]["ASR"], system["metrics"]["ORR"]
        if math.isnan(asr["value"]) or math.isnan(orr["value"]):
            continue
        x, y = 100 * asr["value"], 100 * orr["value"]
        ax.errorbar(x, y, xerr=[[x - 100 * asr["low"]], [100 * asr["high"] - x]],
                    yerr=[[y - 100 * orr["low"]], [100 * orr["high"] - y]], fmt="o", capsize=3, color=f"C{i}")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color=f"C{i}")
    ax.set_xlabel("ASR (%) on harmful prompts  (lower is better)")
    ax.set_ylabel("ORR (%) on benign prompts  (lower is better)")
    ax.set_title("Safety vs overrefusal: lower-left is better (95% bootstrap CIs)", fontsize=10)
    # Start both axes just below 0 so that points at 0% (common for small models) are not cut by the frame.
    for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        top = max(get()[1], 1.0)
        set_(-0.04 * top, top)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, out_dir) -> dict:
    """results.json, results.md and pareto.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "pareto.png"}
    paths["json"].write_text(json.dumps(results, indent=1, ensure_ascii=False))
    paths["markdown"].write_text(markdown_report(results))
    pareto_plot(results, paths["plot"])
    return paths


def rejudge(results: dict, judge, n_resamples: int, seed: int) -> dict:
    """The same answers labelled by another judge: no generation, only new labels and metrics. A judge that training
    did not use is the check for reward hacking (answers that fool the training judge but not another one)."""
    rows = [r for system in results["systems"].values() for r in system["records"]]
    items = [(r["prompt"], r[key], r["label"]) for r in rows for key in ("first_answer", "final_answer")]
    labels = judge(*map(list, zip(*items))) if items else []
    for i, r in enumerate(rows):
        first, final = labels[2 * i], labels[2 * i + 1]
        r.update(first_unsafe=first.unsafe, first_overrefuse=first.overrefuse, unsafe=final.unsafe,
                 overrefuse=final.overrefuse)
    for system in results["systems"].values():
        system["metrics"] = summarize(system["records"], n_resamples, seed)
    results["judge"] = getattr(judge, "name", str(judge))
    return results


# ----------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate WaltzRL against its baselines: ASR (harmful prompts answered unsafely), ORR (benign "
                    "prompts refused), FTR (feedback trigger rate), latency and tokens, with 95% bootstrap CIs. "
                    "Writes results.md, results.json (with per-prompt records) and pareto.png (ASR vs ORR) to --out.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    parser.add_argument("--adapters", default=None,
                        help="folder with trained conversation/ and feedback/ adapters (train.py output or any "
                             "checkpoint) for the 'waltzrl' system; without it that system is skipped")
    parser.add_argument("--single-agent-adapters", default=None,
                        help="adapters of a `train.py --single-agent` run (conversation agent trained alone with R_c) "
                             "for the 'single-agent' and 'single-agent+safeguard' systems; without it they are skipped")
    parser.add_argument("--prompts", default="data/prompts.jsonl",
                        help="our JSONL prompt file, or a public benchmark name such as bench-llm/or-bench (data.py)")
    parser.add_argument("--split", default="eval", choices=("train", "eval", "test"),
                        help="which split of the prompts (data/heldout.jsonl is all 'test')")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only this many prompts, taken round-robin over categories")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated systems to compare, from: {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--judge", default="default",
                        help="judge spec (judge.load_judge): 'default' = prompt label + embedding refusal detector, "
                             "'default:phrase', 'default:prefix', 'hf:<model>', 'http://host:port/v1#<model>'")
    parser.add_argument("--safeguard", default="judge", choices=("judge", "feedback-agent"),
                        help="safety check of base+safeguard: 'judge' (oracle safeguard: the judge's unsafe label) or "
                             "'feedback-agent' (the untrained feedback agent's unsafe label)")
    add_generation_limit_flags(parser)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of both agents; 0 = greedy (default, reproducible)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (temperature > 0) and the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--out", default="runs/eval",
                        help="output folder for results.md/.json and pareto.png; each finished system's records are "
                             "also kept in <out>/systems/ as soon as it completes")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the systems an interrupted run with the same settings finished (<out>/systems/) "
                             "and evaluate only the others")
    parser.add_argument("--rejudge", default=None, metavar="RESULTS_JSON",
                        help="generate nothing: re-label the answers stored in an earlier results.json with --judge "
                             "(e.g. a judge that training did not use) and write the new tables to --out")
    return parser


def report(results: dict, out_dir) -> int:
    """Write results.json/.md and pareto.png, print the table and where they are."""
    paths = write_reports(results, out_dir)
    print(markdown_report(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def writable_folder(path: str) -> Path:
    """--out, created and checked writable before any generation (not after an hour of it)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"--out {path}: cannot write there ({err.strerror or err})") from None
    return folder


def main(argv=None) -> int:
    from data import DatasetLoadError, PromptFileError, load_prompts, spread_over_categories
    from judge import judge_from_flag

    args = build_parser().parse_args(argv)
    if args.rejudge:
        try:
            results = json.loads(Path(args.rejudge).read_text())
            results["systems"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"--rejudge {args.rejudge}: not a results.json written by eval.py ({err})") from None
        writable_folder(args.out)
        return report(rejudge(results, judge_from_flag(args.judge), args.bootstrap, args.seed), args.out)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    # Canonical order: waltzrl swaps the fresh adapters out, so every untrained system must run before it.
    systems = sorted(set(systems), key=SYSTEMS.index)
    if "waltzrl" in systems and not args.adapters:
        print("waltzrl: skipped (no --adapters given)", file=sys.stderr)
        systems.remove("waltzrl")
        if not systems:
            raise SystemExit("--systems: nothing to evaluate (waltzrl needs --adapters)")
    if set(SINGLE_AGENT_SYSTEMS) & set(systems) and not args.single_agent_adapters:
        print("single-agent systems: skipped (no --single-agent-adapters given)", file=sys.stderr)
        systems = [s for s in systems if s not in SINGLE_AGENT_SYSTEMS]
        if not systems:
            raise SystemExit("--systems: nothing to evaluate (single-agent systems need --single-agent-adapters)")
    for flag, folder in (("--adapters", args.adapters), ("--single-agent-adapters", args.single_agent_adapters)):
        missing = [a for a in AGENTS if folder and not (Path(folder) / a / "adapter_config.json").exists()]
        if missing:
            raise SystemExit(f"{flag} {folder}: no saved adapter for {missing} "
                             f"(expected {folder}/<agent>/adapter_config.json, the output of train.py)")
        for agent in AGENTS if folder else ():  # readable, not only present: a truncated file fails now, not later
            check_saved_adapter(Path(folder) / agent)
    args.max_new_tokens, args.feedback_max_new_tokens = generation_limits(
        args.adapters or args.single_agent_adapters, args.max_new_tokens, args.feedback_max_new_tokens)
    for flag in ("max_new_tokens", "feedback_max_new_tokens", "batch_size", "bootstrap"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    try:
        prompts = spread_over_categories(load_prompts(args.prompts, split=args.split), args.limit)
    except (PromptFileError, DatasetLoadError, FileNotFoundError) as err:
        raise SystemExit(f"--prompts {args.prompts}: {err}") from None
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in split {args.split!r}")
    out = writable_folder(args.out)
    store = out / "systems"  # each system's records, written as it completes
    settings_of = lambda system: system_settings(args, prompts, system)  # noqa: E731
    finished = load_finished(store, systems, settings_of) if args.resume else {}

    began = time.perf_counter()
    judge = judge_from_flag(args.judge)
    base, tokenizer = load_base(args.model)
    config = inference_config(args.temperature, args.max_new_tokens, args.feedback_max_new_tokens,
                              batch_size=args.batch_size)
    window = context_window(base)
    needs = longest_contexts(tokenizer, [p["prompt"] for p in prompts], config) if window else []
    too_long = [(p["id"], need) for p, need in zip(prompts, needs) if need > window]
    if too_long:  # an evaluation set is evaluated whole: no prompt is silently dropped or cut
        raise SystemExit(f"--prompts {args.prompts}: {len(too_long)} prompt(s) do not fit the model's {window}-token "
                         f"context with --max-new-tokens {args.max_new_tokens} and --feedback-max-new-tokens "
                         f"{args.feedback_max_new_tokens} (prompt {too_long[0][0]!r} needs {too_long[0][1]})")
    model = attach_agents(base)  # fresh zero-init adapters = the untrained prompted agents
    if not args.resume:
        for stale in store.glob("*.json"):  # an earlier run's records must not pass for this run's
            stale.unlink()
    store.mkdir(exist_ok=True)
    if finished:
        print(f"resume: reusing {', '.join(finished)} from {store}", file=sys.stderr)
    try:
        records, model = run_systems(model, tokenizer, prompts, judge, systems, config, args.adapters,
                                     args.safeguard, args.seed, args.single_agent_adapters, finished,
                                     lambda system, rows: save_system(store, system, rows, settings_of(system)))
    except KeyboardInterrupt:
        done = sorted(p.stem for p in store.glob("*.json"))
        print(f"\nInterrupted: the finished systems ({', '.join(done) or 'none'}) are kept in {store}; run again "
              f"with --resume to evaluate only the others", file=sys.stderr)
        return 130
    safeguard = ("oracle: the judge's unsafe label" if args.safeguard == "judge"
                 else "the untrained feedback agent's unsafe label")
    results = {"prompts": f"{args.prompts} (split {args.split})", "n_prompts": len(prompts),
               "n_harmful": sum(p["label"] == "harmful" for p in prompts),
               "n_benign": sum(p["label"] == "benign" for p in prompts),
               "judge": getattr(judge, "name", args.judge), "safeguard": safeguard, "seed": args.seed,
               "bootstrap_resamples": args.bootstrap, "batch_size": args.batch_size,
               "config": vars(args), "wall_seconds": time.perf_counter() - began,
               "systems": {name: {"metrics": summarize(rows, args.bootstrap, args.seed), "records": rows}
                           for name, rows in records.items()}}
    report(results, args.out)
    if "waltzrl" in records:  # the trained adapters' model cards get this table (model_card.py)
        try:
            cards = add_evaluation(args.adapters, markdown_report(results).split("\n", 2)[2])
            print("added this table to " + ", ".join(str(c) for c in cards))
        except OSError as err:
            print(f"warning: could not add the table to the model cards in {args.adapters}: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

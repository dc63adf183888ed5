"""What eval.py keeps and shows: bootstrap confidence intervals, the per-system store behind `eval.py --resume`, and
the report (results.json, results.md, the ASR-vs-ORR Pareto plot). The metrics themselves and the systems compared
are eval.py's.
"""
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np


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
        lines += ["", "Revisions (counts): after a correct flag of a bad first answer, fixed / still bad; after a "
                  "false "
                  "alarm on a good one, broken:", "",
                  "| system | correct flags | fixed | still bad | false alarms | broken |",
                  "|---|---:|---:|---:|---:|---:|"]
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
    """results.json, results.md and pareto.png into out_dir, each replaced whole (a reader never sees half a
    file); returns their paths."""
    from nanowaltz.checkpoint import write_whole
    from nanowaltz.cpu_threads import numerics_record

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "pareto.png"}
    results.setdefault("numerics", numerics_record())  # what the numbers depend on (an earlier one for --rejudge)
    write_whole(paths["json"], json.dumps(results, indent=1, ensure_ascii=False))
    write_whole(paths["markdown"], markdown_report(results))
    part = out_dir / "pareto.part.png"
    pareto_plot(results, part)
    part.replace(paths["plot"])
    return paths


def writable_folder(path: str) -> Path:
    """--out, created, checked writable and locked for this process (checkpoint.lock_out) before any generation (not
    after an hour of it): a second evaluation or a training run into the same folder stops, naming this one."""
    from nanowaltz.checkpoint import lock_out

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"--out {path}: cannot write there ({err.strerror or err})") from None
    return lock_out(folder, "eval.py")


def check_earlier_evaluation(store: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to discard the finished systems of an earlier evaluation in --out unless asked (--overwrite)."""
    found = sorted(p.stem for p in store.glob("*.json"))
    if found and not resume and not overwrite:
        raise SystemExit(f"--out {store.parent} holds an earlier evaluation's finished systems ({', '.join(found)}): "
                         f"--resume reuses those evaluated with the same settings, --overwrite discards them")



def in_chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True)


class CachedJudge:
    """The judge with a memo on (prompt, response, label): the shared base answers are judged once."""

    def __init__(self, judge):
        self.judge, self.memo = judge, {}
        self.name = getattr(judge, "name", type(judge).__name__)

    def __call__(self, prompts, responses, prompt_labels):
        keys = list(zip(prompts, responses, prompt_labels))
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if todo:
            for key, labels in zip(todo, self.judge(*map(list, zip(*todo)))):
                self.memo[key] = labels
        return [self.memo[k] for k in keys]


def system_settings(args, prompts, adapters_folder=None) -> dict:
    """What a system's records depend on; --resume reuses stored records only when these are all unchanged."""
    settings = {k: getattr(args, k) for k in ("model", "prompts", "split", "limit", "judge", "safeguard", "temperature",
                                              "seed", "max_new_tokens", "feedback_max_new_tokens", "batch_size")}
    settings["prompt_digest"] = hashlib.sha1(json.dumps([(p["id"], p["prompt"], p["label"]) for p in prompts])
                                             .encode()).hexdigest()
    folder = adapters_folder
    if folder:  # the trained adapters, by content: a run retrained into the same folder is new
        digest = hashlib.sha1()
        for path in sorted(Path(folder).glob("*/adapter_model.safetensors")):
            digest.update(path.read_bytes())
        settings["adapters"], settings["adapters_digest"] = folder, digest.hexdigest()
    return settings


def save_system(folder: Path, system: str, records: list, settings: dict) -> None:
    """One finished system's records, written atomically to folder/<system>.json as soon as it completes."""
    tmp = folder / f"{system}.json.tmp"
    tmp.write_text(json.dumps({"settings": settings, "records": records}, ensure_ascii=False))
    tmp.replace(folder / f"{system}.json")


def load_finished(folder: Path, systems, settings_of) -> dict:
    """Records of the systems an earlier run with the same settings finished (--resume)."""
    finished = {}
    for system in systems:
        path = folder / f"{system}.json"
        if not path.exists():
            continue
        try:
            stored = json.loads(path.read_text())
            stored["settings"], stored["records"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--resume: {path} is unreadable ({err}); delete it or run without --resume") from None
        changed = sorted(k for k, v in settings_of(system).items() if stored["settings"].get(k) != v)
        if changed:
            raise SystemExit(f"--resume: {path} was evaluated with other settings ({', '.join(changed)}); use the "
                             f"same flags, or run without --resume to start over")
        finished[system] = stored["records"]
    return finished


"""Training curves: plot train.py's log.jsonl to a PNG.

One panel per question a reader asks of a WaltzRL run: does the answer get better with feedback (R_c before vs after),
is the feedback agent paid more (R_f and its parts), does it write parseable, correct labels (format rate, label
accuracy), how often does it trigger a revision (FTR), is the batch still unsafe / overrefusing, how far the agents
moved from the reference (KL), where the time goes, and what a cheap greedy eval on a fixed eval subset says while
training runs (train.py --eval-every). A dashed line marks the start of stage 2. A single-agent run
(train.py --single-agent) logs no feedback values (NaN), so its feedback panels say so instead of staying blank.
"""
import json
import math
import sys
from pathlib import Path

PANELS = [
    ("conversation reward", ["conversation_reward_before", "conversation_reward_after"]),
    ("feedback reward", ["feedback_reward", "feedback_dir"]),
    ("feedback format / labels", ["format_rate", "label_accuracy"]),
    ("feedback trigger rate", ["ftr"]),
    ("unsafe / overrefusal (final answers)", ["unsafe_rate_final", "overrefuse_rate_final"]),
    ("KL to reference", ["feedback/kl", "conversation/kl"]),
    ("entropy", ["feedback/entropy", "conversation/entropy"]),
    ("seconds per iteration", ["time_rollout", "time_judge", "time_update", "time_eval"]),
    ("periodic eval (greedy, fixed eval subset)", ["eval/asr", "eval/orr", "eval/asr_first_answer",
                                                   "eval/label_accuracy", "eval/ftr"]),
]


def read_log(path) -> list:
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{number}: not a JSON log line ({err.msg})") from None
    if not records:
        raise SystemExit(f"{path}: empty log")
    return records


def panel_series(records, keys) -> dict:
    """{key: [(iteration, value), ...]} for the keys of one panel that have at least one logged number (not NaN)."""
    series = {}
    for key in keys:
        points = [(r["iteration"], r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        if points:
            series[key] = points
    return series


def plot_training_log(log_path, png_path=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    png_path = str(png_path or Path(log_path).with_name("training_curves.png"))
    iterations = [r["iteration"] for r in records]
    stage2 = next((r["iteration"] for r in records if r.get("stage") == 2), None)
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        series = panel_series(records, keys)
        for key, points in series.items():
            ax.plot(*zip(*points), marker=".", label=key.replace("/", " "))
        if not series:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes, color="gray")
        if stage2 is not None and stage2 > iterations[0]:
            ax.axvline(stage2 - 0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if series:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    single_agent = not panel_series(records, ["feedback_reward", "format_rate", "feedback/kl"])
    fig.suptitle(f"{'single-agent RL' if single_agent else 'WaltzRL'} training: {log_path}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Plot a train.py log (log.jsonl) to a PNG of training curves.")
    parser.add_argument("log", nargs="?", default="runs/waltzrl/log.jsonl", help="path of train.py's log.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: training_curves.png beside the log)")
    args = parser.parse_args(sys.argv[1:])
    print(plot_training_log(args.log, args.out))

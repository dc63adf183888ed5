"""Validate data/prompts.jsonl and (re)assign its train/eval split.

Concept: the project's own prompt set is a small, hand-written stand-in for the paper's training and
evaluation prompts (WildJailbreak for training; WildJailbreak / OR-Bench / XSTest / AlpacaEval for
evaluation). The eval split must not leak into training, so the split is made over groups of
near-duplicate prompts, never over single prompts: two prompts whose normalised text is equal, or whose
word sets overlap heavily (Jaccard >= NEAR_DUP_JACCARD), always land in the same split.

Stratification: per category, and for harmful_adversarial also per wrapper style (the style is the
middle part of the id, e.g. "ha-roleplay-03"), so every style is represented in eval.
About EVAL_FRACTION of each stratum goes to eval; the draw is a seeded shuffle, so reruns are identical.

Simplifications: overlap is measured on bags of lowercase words, not embeddings; paraphrases that
share few words are not caught (the prompts were written to be distinct, so this is a guard, not a
deduplicator).

Usage:
    python data/make_splits.py            # reassign splits, rewrite the file, print counts
    python data/make_splits.py --check    # only validate and print counts; exit 1 on any problem
The committed prompts.jsonl is the source of truth; this script only checks it and sets "split".
"""
import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

PROMPTS_PATH = Path(__file__).with_name("prompts.jsonl")
FIELDS = ("id", "prompt", "label", "category", "split")
LABEL_OF_CATEGORY = {
    "harmful_direct": "harmful",
    "harmful_adversarial": "harmful",
    "benign_sensitive": "benign",
    "everyday": "benign",
}
SPLITS = ("train", "eval")
MIN_EVAL = {"everyday": 20, "harmful_adversarial": 25, "harmful_direct": 15, "benign_sensitive": 30}
EVAL_FRACTION = 0.3
NEAR_DUP_JACCARD = 0.6
MAX_PROMPT_CHARS = 400
SEED = 0


def load_rows(path):
    """Parse and validate every line; raise ValueError naming file, line and field on bad input."""
    rows, seen_ids = [], {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{line_no}"
        if not line.strip():
            raise ValueError(f"{where}: empty line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or tuple(sorted(row)) != tuple(sorted(FIELDS)):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: fields must be exactly {list(FIELDS)}, got {got}")
        for field in FIELDS:
            if not isinstance(row[field], str) or not row[field].strip():
                raise ValueError(f"{where}: field '{field}' must be a non-empty string")
        if row["category"] not in LABEL_OF_CATEGORY:
            raise ValueError(f"{where}: field 'category' is {row['category']!r}, expected one of {list(LABEL_OF_CATEGORY)}")
        if row["label"] != LABEL_OF_CATEGORY[row["category"]]:
            raise ValueError(f"{where}: field 'label' is {row['label']!r} but category {row['category']} needs "
                             f"{LABEL_OF_CATEGORY[row['category']]!r}")
        if row["split"] not in SPLITS:
            raise ValueError(f"{where}: field 'split' is {row['split']!r}, expected one of {list(SPLITS)}")
        if len(row["prompt"]) > MAX_PROMPT_CHARS:
            raise ValueError(f"{where}: field 'prompt' has {len(row['prompt'])} chars, limit {MAX_PROMPT_CHARS}")
        if row["id"] in seen_ids:
            raise ValueError(f"{where}: field 'id' {row['id']!r} already used on line {seen_ids[row['id']]}")
        seen_ids[row["id"]] = line_no
        rows.append(row)
    return rows


def normalise(text):
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def jaccard(a, b):
    words_a, words_b = set(normalise(a).split()), set(normalise(b).split())
    return len(words_a & words_b) / max(1, len(words_a | words_b))


def is_near_duplicate(a, b):
    return normalise(a) == normalise(b) or jaccard(a, b) >= NEAR_DUP_JACCARD


def near_duplicate_groups(rows):
    """Union-find over all pairs (O(n^2), fine for a few hundred prompts). Returns group id per row."""
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if is_near_duplicate(rows[i]["prompt"], rows[j]["prompt"]):
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(rows))]


def stratum(row):
    if row["category"] == "harmful_adversarial":
        return row["category"] + "/" + row["id"].split("-")[1]
    return row["category"]


def assign_splits(rows, seed=SEED):
    """Set row['split'] in place: whole near-duplicate groups go to eval until a stratum hits its quota."""
    group_of = near_duplicate_groups(rows)
    groups_by_stratum = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        # A group spanning strata is filed under its first member's stratum; it still moves as one unit.
        groups_by_stratum[stratum(rows[group_of[i]])][group_of[i]].append(i)
    rng = random.Random(seed)
    for name in sorted(groups_by_stratum):
        groups = [groups_by_stratum[name][g] for g in sorted(groups_by_stratum[name])]
        rng.shuffle(groups)
        quota = round(EVAL_FRACTION * sum(len(g) for g in groups))
        n_eval = 0
        for members in groups:
            split = "eval" if n_eval + len(members) <= quota else "train"
            n_eval += len(members) if split == "eval" else 0
            for i in members:
                rows[i]["split"] = split


def cross_split_problems(rows):
    """Pairs (train id, eval id, jaccard) that are identical or near-identical across splits."""
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    return [(t["id"], e["id"], round(jaccard(t["prompt"], e["prompt"]), 2))
            for t in train for e in evals if is_near_duplicate(t["prompt"], e["prompt"])]


def count_table(rows):
    counts = Counter((r["category"], r["split"]) for r in rows)
    lines = ["| category | label | train | eval | total |", "|---|---|---:|---:|---:|"]
    for cat, label in LABEL_OF_CATEGORY.items():
        tr, ev = counts[(cat, "train")], counts[(cat, "eval")]
        lines.append(f"| {cat} | {label} | {tr} | {ev} | {tr + ev} |")
    tr, ev = sum(r["split"] == "train" for r in rows), sum(r["split"] == "eval" for r in rows)
    lines.append(f"| **all** | | {tr} | {ev} | {tr + ev} |")
    styles = Counter((r["id"].split("-")[1], r["split"]) for r in rows if r["category"] == "harmful_adversarial")
    lines += ["", "| harmful_adversarial style | train | eval |", "|---|---:|---:|"]
    for style in sorted({s for s, _ in styles}):
        lines.append(f"| {style} | {styles[(style, 'train')]} | {styles[(style, 'eval')]} |")
    return "\n".join(lines)


def check(rows):
    """Return a list of human-readable problems (empty when the file is fine)."""
    problems = [f"near-duplicate across splits: {t} (train) ~ {e} (eval), jaccard {j}"
                for t, e, j in cross_split_problems(rows)]
    n_eval = Counter(r["category"] for r in rows if r["split"] == "eval")
    problems += [f"category {cat}: only {n_eval[cat]} eval prompts, need at least {need}"
                 for cat, need in MIN_EVAL.items() if n_eval[cat] < need]
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="validate only; do not rewrite the file")
    parser.add_argument("--path", type=Path, default=PROMPTS_PATH)
    args = parser.parse_args()
    try:
        rows = load_rows(args.path)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if not args.check:
        assign_splits(rows)
        args.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(count_table(rows))
    problems = check(rows)
    for p in problems:
        print("problem:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

"""Validate data/heldout.jsonl, the held-out test set, and check that it is far from data/prompts.jsonl.

heldout.jsonl is a second test set written to be unlike prompts.jsonl (other topics, phrasings and jailbreak styles;
see data/README.md). This script checks what that promise can be checked on:
  - every line loads with data.py (same five fields), split is "test", the category is one of the four known ones
    and the label matches it, prompts are at most 400 characters, ids are unique and unused in prompts.jsonl;
  - no held-out prompt is a near-duplicate of ANY prompt in prompts.jsonl (train or eval): normalised text equal,
    or word-set Jaccard >= MAX_JACCARD (0.5, stricter than the 0.6 that keeps train and eval apart);
  - no two held-out prompts are near-duplicates of each other (Jaccard >= 0.6, as in make_splits.py).
It prints the counts per category and the closest pair found, and exits with 1 on any problem.

    python data/check_heldout.py

Limitation: word overlap misses paraphrases; the topics were chosen by hand to differ (data/README.md).
"""
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # data.py lives in the repository root
sys.path.insert(0, str(HERE))

from nanowaltz.data import load_prompts  # noqa: E402
from make_splits import LABEL_OF_CATEGORY, MAX_PROMPT_CHARS, NEAR_DUP_JACCARD, jaccard, normalise  # noqa: E402

HELDOUT_PATH = HERE / "heldout.jsonl"
PROMPTS_PATH = HERE / "prompts.jsonl"
MAX_JACCARD = 0.5


def closest_pairs(heldout, prompts):
    """(jaccard, heldout id, prompts id) of each held-out prompt's closest prompts.jsonl prompt, highest first."""
    pairs = []
    for h in heldout:
        score, other = max((1.0 if normalise(h["prompt"]) == normalise(p["prompt"])
                            else jaccard(h["prompt"], p["prompt"]), p["id"]) for p in prompts)
        pairs.append((score, h["id"], other))
    return sorted(pairs, reverse=True)


def problems(heldout, prompts) -> list:
    """Everything wrong with the held-out set, one line each (empty list = all good)."""
    found = []
    known_ids = {p["id"] for p in prompts}
    for r in heldout:
        where = f"heldout.jsonl id {r['id']}"
        if r["split"] != "test":
            found.append(f"{where}: split is {r['split']!r}, expected 'test'")
        if r["category"] not in LABEL_OF_CATEGORY:
            found.append(f"{where}: category {r['category']!r}, expected one of {list(LABEL_OF_CATEGORY)}")
        elif r["label"] != LABEL_OF_CATEGORY[r["category"]]:
            found.append(f"{where}: label {r['label']!r} but category {r['category']} needs "
                         f"{LABEL_OF_CATEGORY[r['category']]!r}")
        if len(r["prompt"]) > MAX_PROMPT_CHARS:
            found.append(f"{where}: prompt has {len(r['prompt'])} chars, limit {MAX_PROMPT_CHARS}")
        if r["id"] in known_ids:
            found.append(f"{where}: id also used in prompts.jsonl")
    found += [f"near-duplicate of prompts.jsonl: {h} ~ {p}, jaccard {score:.2f}"
              for score, h, p in closest_pairs(heldout, prompts) if score >= MAX_JACCARD]
    for i, a in enumerate(heldout):
        for b in heldout[i + 1:]:
            score = jaccard(a["prompt"], b["prompt"])
            if normalise(a["prompt"]) == normalise(b["prompt"]) or score >= NEAR_DUP_JACCARD:
                found.append(f"near-duplicate inside heldout.jsonl: {a['id']} ~ {b['id']}, jaccard {score:.2f}")
    return found


def main() -> int:
    try:
        heldout, prompts = load_prompts(str(HELDOUT_PATH)), load_prompts(str(PROMPTS_PATH))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = Counter((r["category"], r["label"]) for r in heldout)
    n_harmful = sum(r["label"] == "harmful" for r in heldout)
    print(f"{HELDOUT_PATH.name}: {len(heldout)} prompts, {n_harmful} harmful / {len(heldout) - n_harmful} benign")
    for (category, label), n in sorted(counts.items()):
        print(f"  {category:20s} {label:8s} {n:4d}")
    score, h, p = closest_pairs(heldout, prompts)[0]
    print(f"closest pair to prompts.jsonl: {h} ~ {p}, word-set jaccard {score:.2f} (limit {MAX_JACCARD})")
    found = problems(heldout, prompts)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests for the held-out test set data/heldout.jsonl and its check (data/check_heldout.py)."""
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

import eval as evaluation
from nanowaltz.cli import parse
from nanowaltz.data import load_prompts, spread_over_categories

ROOT = Path(__file__).resolve().parents[1]
HELDOUT, PROMPTS = ROOT / "data" / "heldout.jsonl", ROOT / "data" / "prompts.jsonl"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_heldout", ROOT / "data" / "check_heldout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_loads_as_the_test_split_with_the_four_categories():
    heldout = load_prompts(str(HELDOUT), split="test")
    assert len(heldout) == len(load_prompts(str(HELDOUT))) and 120 <= len(heldout) <= 160  # every line is "test"
    assert set(Counter(r["category"] for r in heldout)) == {"harmful_direct", "harmful_adversarial",
                                                            "benign_sensitive", "everyday"}
    assert 0.40 <= sum(r["label"] == "harmful" for r in heldout) / len(heldout) <= 0.50
    assert all(r["id"].startswith("x-") for r in heldout)
    assert load_prompts(str(PROMPTS), split="test") == []  # the training file has no test prompts


def test_heldout_passes_its_check_and_the_check_catches_a_copied_or_mislabelled_prompt(check):
    heldout, prompts = load_prompts(str(HELDOUT)), load_prompts(str(PROMPTS))
    assert check.problems(heldout, prompts) == []
    assert check.closest_pairs(heldout, prompts)[0][0] < check.MAX_JACCARD
    copied = dict(prompts[0], id="x-copy", split="test")  # a training prompt slipped into the test set
    reworded = dict(copied, id="x-reworded", prompt=copied["prompt"].upper() + "!!")
    mislabelled = dict(heldout[0], id="x-bad", label="benign")
    found = check.problems(heldout + [copied, reworded, mislabelled], prompts)
    assert any(f"x-copy ~ {prompts[0]['id']}, jaccard 1.00" in line for line in found)
    assert any(f"x-reworded ~ {prompts[0]['id']}" in line for line in found)
    assert any("x-bad: label 'benign' but category harmful_direct needs 'harmful'" in line for line in found)
    assert any("near-duplicate inside heldout.jsonl: x-hd-001 ~ x-bad" in line for line in found)


def test_eval_cli_accepts_the_test_split_and_a_short_run_covers_every_category():
    args = parse(evaluation.EvalArgs, "", ["--prompts", str(HELDOUT), "--split", "test", "--limit", "8"])
    chosen = spread_over_categories(load_prompts(args.prompts, split=args.split), args.limit)
    assert Counter(r["category"] for r in chosen) == {"harmful_direct": 2, "harmful_adversarial": 2,
                                                      "benign_sensitive": 2, "everyday": 2}
    with pytest.raises(SystemExit):
        parse(evaluation.EvalArgs, "", ["--split", "dev"])

"""Blind labelling: split answers into task files that hide which system wrote them, and merge labels back.

    python data/judge_labels/blind.py split --parts 6 --out /tmp/tasks   # only answers not labelled yet
    python data/judge_labels/blind.py merge --labels /tmp/labels --into data/judge_labels/part-01.jsonl
    python data/judge_labels/blind.py second --n 200 --parts 2 --out /tmp/second   # a sample to label twice

A task line is {"key", "prompt", "answer", "feedback"} (feedback only for a revision). The key is a hash of the
answer's id, so the reader cannot tell the base model from a trained pair, greedy from sampled, or fit from test.
"""
import argparse
import glob
import hashlib
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ROOT / "data" / "judge_answers.jsonl"
LABELS = ROOT / "data" / "judge_labels"


def key_of(answer_id: str) -> str:
    return "a" + hashlib.sha1(answer_id.encode()).hexdigest()[:10]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def labelled_ids(folder: Path) -> set:
    return {r["id"] for path in sorted(folder.glob("*.jsonl")) for r in read_jsonl(path)}


def task(record: dict) -> dict:
    out = {"key": key_of(record["id"]), "prompt": record["prompt"], "answer": record["answer"]}
    if record["turn"] == "revision":
        out["feedback"] = record["feedback"]
    return out


def write_parts(records, parts, out, seed):
    random.Random(seed).shuffle(records)
    Path(out).mkdir(parents=True, exist_ok=True)
    for p in range(parts):
        with open(Path(out) / f"part-{p:02d}.jsonl", "w", encoding="utf-8") as f:
            for r in records[p::parts]:
                f.write(json.dumps(task(r), ensure_ascii=False) + "\n")
        print(f"{out}/part-{p:02d}.jsonl: {len(records[p::parts])} tasks")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["split", "merge", "second"])
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--n", type=int, default=200, help="second: how many answers to sample")
    ap.add_argument("--where", default="", help="split: only answers whose id contains this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="split/second: folder for task files")
    ap.add_argument("--labels", help="merge: folder of label files {key, refusal, harmful, off_topic, note}")
    ap.add_argument("--into", help="merge: the labels file to write (id-keyed)")
    args = ap.parse_args()
    answers = read_jsonl(ANSWERS)
    if args.command == "split":
        done = labelled_ids(LABELS)
        todo = [r for r in answers if r["id"] not in done and args.where in r["id"]]
        write_parts(todo, args.parts, args.out, args.seed)
    elif args.command == "second":
        pool = [r for r in answers if args.where in r["id"]]
        write_parts(random.Random(args.seed + 1).sample(pool, args.n), args.parts, args.out, args.seed)
    else:
        by_key = {key_of(r["id"]): r["id"] for r in answers}
        merged, bad = {}, 0
        for path in sorted(glob.glob(f"{args.labels}/*.jsonl")):
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                try:
                    lab = json.loads(line)
                    row = {"id": by_key[lab["key"]], **{k: lab[k] for k in ("refusal", "harmful", "off_topic")},
                           "note": lab.get("note", "")}
                    assert all(isinstance(row[k], bool) for k in ("refusal", "harmful", "off_topic"))
                except (ValueError, KeyError, AssertionError):
                    bad += 1
                    print(f"{path}:{n}: skipped, not a label line: {line.strip()[:100]}")
                    continue
                merged[row["id"]] = row  # a key labelled twice in one folder: the later line wins
        Path(args.into).parent.mkdir(parents=True, exist_ok=True)
        with open(args.into, "w", encoding="utf-8") as f:
            for row in merged.values():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{args.into}: {len(merged)} labels ({bad} lines skipped)")


if __name__ == "__main__":
    main()

"""Which of parse_feedback's paths decide real feedback-agent outputs (nanowaltz/feedback_json.py).

The feedback agent writes '{"unsafe":' (prefilled) + whatever it samples; parse_feedback turns that text into labels,
or None, and so decides R_format and R_label. This script counts, for stored outputs of our own agents, which path
of the parser decided each one:

    json, first '{'         the text from the first object start decodes as JSON (json module, strict)
    json, later '{'         an earlier object start did not decode (or had no labels), a later one did
    + control chars         the decode needed strict=False (a raw newline or tab inside a string)
    + nested                the labels sat in a dict inside the object, not at its top level
    + label words/ints      a label value was "true"/"no"/0/1 ... rather than a JSON boolean
    + key variant           a label key differed from "unsafe"/"overrefuse" (case, '_', '-')
    + non-string text       feedback or reasoning was null, a number, a list or an object
    repair (<kinds>)        no object start decoded as JSON, yet the parser accepted the text: only a repair pass can
                            have decided it; the kinds are what the text shows (single quotes, trailing comma, bare
                            words/keys, Python literals)
    cut off, labels false   an object cut off after two false labels: what early stop (rollout.py) leaves
    none (...)              unparseable (R_format = 0): the labels are missing or not booleans, or they are written
                            but the object is neither JSON (repaired or not) nor cut off after two false labels, or
                            "a dropped path would read it": one of the json paths above that the parser no longer
                            takes (a dropped repair, such as of a trailing comma, shows as a broken object)

The classifier uses only the json module and the parser's public functions (it walks the object starts in the order
the tolerant parser of the first count did and checks that its reading agrees with parse_feedback's), so it runs
against any version of the parser and tells which dropped path a new output would need; a text whose path it cannot
tell is counted as "unexplained" (none so far).

Sources: the feedback_output of eval stores (eval.py --out DIR writes DIR/systems/*.json; greedy decoding), and
rollouts sampled here at training settings (--collect: temperature 1, 48/64 new tokens, batch 64), with early stop on
(what training parses) and off (so complete objects, with their text, appear too).

    HF_HUB_OFFLINE=1 python bench/feedback_paths.py --collect /tmp/fp/sampled.jsonl --n-prompts 96
    HF_HUB_OFFLINE=1 python bench/feedback_paths.py --collect /tmp/fp/sampled.jsonl --n-prompts 96 \\
        --adapters runs/x/adapters
    python bench/feedback_paths.py /tmp/fp/sampled.jsonl /tmp/run/eval/systems/*.json
    python bench/feedback_paths.py tests/fixtures/feedback_outputs.jsonl
    python bench/feedback_paths.py --write-fixture tests/fixtures/feedback_outputs.jsonl SOURCES...

--write-fixture stores the deduplicated texts (at most --cap) with the CURRENT parser's result for each:
tests/test_feedback_parser.py checks that the parser still gives exactly those results (the rewards stay the same).
So add outputs to the fixture with a parser whose results you mean to keep, never to make a changed parser pass.
"""
import argparse
import collections
import glob
import json
import os
import random
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from nanowaltz.feedback_json import (ParsedFeedback, feedback_object_closed, labels_prefix_complete,  # noqa: E402
                                     parse_feedback)
from nanowaltz.judge import Labels  # noqa: E402

OBJECT_START = re.compile(r"""\{\s*["'A-Za-z_}]""")  # where an object can start ('{' then a key or '}')
LABEL_KEYS = ("unsafe", "overrefuse")
STRICT, LENIENT = json.JSONDecoder(), json.JSONDecoder(strict=False)


# ---------------------------------------------------------------------------------------------------------------------
# Reading stored outputs
# ---------------------------------------------------------------------------------------------------------------------
def read_outputs(path: str) -> list[dict]:
    """[{source, text}] from a JSONL of {source, text} (a --collect file or the fixture) or an eval store (JSON with
    records[].feedback_output; the source is the store's folder and system name)."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [{"source": r["source"], "text": r["text"]} for r in map(json.loads, filter(str.strip, f))]
    with open(path) as f:
        store = json.load(f)
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))
    system = os.path.splitext(os.path.basename(path))[0]
    return [{"source": f"eval:{run}/{system}", "text": r["feedback_output"]}
            for r in store.get("records", []) if r.get("feedback_output")]  # "" where the system has no feedback agent


# ---------------------------------------------------------------------------------------------------------------------
# Which path decided a text
# ---------------------------------------------------------------------------------------------------------------------
def normalize_key(key) -> str:
    return re.sub(r"[^a-z]", "", str(key).lower())


def as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in ("true", "yes", "1") else False if word in ("false", "no", "0") else None
    return None


def labelled_dict(obj, depth=0):
    """(dict, depth) of the shallowest dict (depth <= 3) whose two labels read as booleans, breadth first."""
    frontier = [obj]
    for level in range(4):
        nxt = []
        for node in frontier:
            if isinstance(node, dict):
                fields = {}
                for k, v in node.items():
                    fields.setdefault(normalize_key(k), v)
                if all(as_bool(fields.get(k)) is not None for k in LABEL_KEYS):
                    return node, level
                nxt.extend(v for v in node.values() if isinstance(v, (dict, list)))
            elif isinstance(node, list):
                nxt.extend(v for v in node if isinstance(v, (dict, list)))
        frontier = nxt
    return None, None


def agrees(node: dict, result) -> bool:
    """Whether parse_feedback's result is this labelled dict's reading (feedback/reasoning compared when strings)."""
    if result is None:
        return False
    first = {}
    for key, value in node.items():
        first.setdefault(normalize_key(key), value)
    if Labels(as_bool(first["unsafe"]), as_bool(first["overrefuse"])) != result.labels:
        return False
    return all(not isinstance(first.get(k), str) or first[k] == getattr(result, k) for k in ("feedback", "reasoning"))


def repair_kinds(text: str) -> list[str]:
    """What a repair pass had to fix, as far as the text shows: with the double- and then the single-quoted strings
    blanked out, what is left besides JSON's own literals (identifiers, quotes, commas before a closing bracket)."""
    body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    kinds = ["single quotes"] if re.search(r"""[{,:\[]\s*'""", body) else []
    body = re.sub(r"'(?:[^'\\]|\\.)*'", "''", body)
    if re.search(r",\s*[}\]]", body):
        kinds.append("trailing comma")
    for match in re.finditer(r"(?<![\w.])[A-Za-z_][\w-]*(\s*:)?", body):
        word = match.group().rstrip(": \t\n")
        if match.group(1):
            kinds.append("bare key")
        elif word in ("True", "False", "None"):
            kinds.append("Python literal")
        elif word not in ("true", "false", "null"):
            kinds.append("bare word")
    return sorted(set(kinds)) or ["?"]


def classify(text: str, result) -> str:
    """The path that decided `text`, given parse_feedback(text) == result (see the module docstring)."""
    lowered = text.lower()
    last_start = min(lowered.rfind("unsafe"), lowered.rfind("refuse"))
    undecodable_before = False
    match, starts = OBJECT_START.search(text), 0
    while match is not None and match.start() < last_start and starts < 64:
        starts += 1
        pos, needs = match.start(), []
        try:
            obj, end = STRICT.raw_decode(text, pos)
        except ValueError:
            try:
                obj, end = LENIENT.raw_decode(text, pos)
                needs.append("control chars")
            except ValueError:
                undecodable_before = True
                match = OBJECT_START.search(text, pos + 1)
                continue
        node, depth = labelled_dict(obj)
        if node is None:
            match = OBJECT_START.search(text, end)
            continue
        where = "first" if starts == 1 else "later"
        if depth:
            needs.append("nested")
        first = {}
        for key, value in node.items():
            first.setdefault(normalize_key(key), (key, value))
        if any(first[k][0] != k for k in LABEL_KEYS):
            needs.append("key variant")
        if any(not isinstance(first[k][1], bool) for k in LABEL_KEYS):
            needs.append("label words/ints")
        if any(not isinstance(first.get(k, ("", ""))[1], str) for k in ("feedback", "reasoning")):
            needs.append("non-string text")
        path = f"json, {where} '{{'" + "".join(f" + {n}" for n in needs)
        if not agrees(node, result):  # an earlier object start was decided otherwise (a repair), or none
            if result is None and not undecodable_before:  # what a more tolerant parser would have read
                return f"none (a dropped path would read it: {path})"
            break
        if undecodable_before:
            return "json, later '{' (after an undecodable one: a repair there might also have read it)"
        return path
    if result is None:
        if labels_prefix_complete(text) is None:
            return "none (labels missing or not booleans)"
        return "none (labels written; object unfinished or broken)"
    if (result == ParsedFeedback(Labels(False, False), "", "") and labels_prefix_complete(text) == Labels(False, False)
            and not feedback_object_closed(text)):  # a repair needs the object closed; the cut-off path needs it open
        return "cut off, labels false"
    if undecodable_before:
        return "repair (" + ", ".join(repair_kinds(text)) + ")"
    return "unexplained"


def table(records) -> tuple[list, dict]:
    counts = collections.defaultdict(collections.Counter)
    for r in records:
        counts[classify(r["text"], parse_feedback(r["text"]))][r["source"]] += 1
    sources = sorted({r["source"] for r in records})
    return sources, counts


def print_table(sources, counts) -> None:
    short = [s.replace("sampled:", "").replace("eval:", "eval ") for s in sources]
    width = max(len(p) for p in counts) if counts else 4
    print(f"{'path':<{width}} | " + " | ".join(short) + " | total")
    print("-" * width + "-|-" + "-|-".join("-" * len(s) for s in short) + "-|------")
    for path in sorted(counts, key=lambda p: -sum(counts[p].values())):
        row = [f"{counts[path][s]:>{len(h)}}" for s, h in zip(sources, short)]
        print(f"{path:<{width}} | " + " | ".join(row) + f" | {sum(counts[path].values()):>5}")
    totals = [f"{sum(c[s] for c in counts.values()):>{len(h)}}" for s, h in zip(sources, short)]
    print(f"{'total':<{width}} | " + " | ".join(totals) + f" | {sum(sum(c.values()) for c in counts.values()):>5}")


# ---------------------------------------------------------------------------------------------------------------------
# The fixture: texts with the parser's result
# ---------------------------------------------------------------------------------------------------------------------
def result_record(result) -> dict | None:
    if result is None:
        return None
    return {"unsafe": result.labels.unsafe, "overrefuse": result.labels.overrefuse,
            "feedback": result.feedback, "reasoning": result.reasoning}


def write_fixture(records, path: str, cap: int, seed: int = 0) -> None:
    """Deduplicated texts (first source kept), at most `cap`: every text of the rarer paths, then a random sample of
    the rest, so no path that fires is left out."""
    seen, unique = set(), []
    for r in records:
        if r["text"] not in seen:
            seen.add(r["text"])
            unique.append(r)
    by_path = collections.defaultdict(list)
    for r in unique:
        by_path[classify(r["text"], parse_feedback(r["text"]))].append(r)
    chosen, rng = [], random.Random(seed)
    for path_name in sorted(by_path, key=lambda p: len(by_path[p])):
        left = cap - len(chosen)
        group = by_path[path_name]
        share = max(left // max(1, sum(1 for p in by_path if len(by_path[p]) >= len(group))), 1)
        chosen.extend(group if len(group) <= share else rng.sample(group, share))
    chosen.sort(key=lambda r: (r["source"], r["text"]))
    with open(path, "w") as f:
        for r in chosen[:cap]:
            f.write(json.dumps({"source": r["source"], "text": r["text"],
                                "parsed": result_record(parse_feedback(r["text"]))}, ensure_ascii=False) + "\n")
    print(f"wrote {min(len(chosen), cap)} of {len(unique)} distinct texts ({len(records)} in all) to {path}")


# ---------------------------------------------------------------------------------------------------------------------
# Sampling new outputs at training settings
# ---------------------------------------------------------------------------------------------------------------------
def collect(args) -> None:
    from nanowaltz import cpu_threads  # noqa: F401  (before torch, as the entry points)
    import torch

    from nanowaltz.data import load_prompts
    from nanowaltz.models import load_agents_or_fresh
    from rollout import RolloutConfig, rollout

    prompts = load_prompts(args.prompts, split="train")
    rng = random.Random(args.seed)
    prompts = rng.sample(prompts, min(args.n_prompts, len(prompts)))
    model, tokenizer = load_agents_or_fresh("default", args.adapters)
    pair = "trained" if args.adapters else "untrained"
    with open(args.collect, "a") as f:
        for early in args.early_stop:
            config = RolloutConfig(conversation_max_new_tokens=48, feedback_max_new_tokens=64,
                                   conversation_temperature=1.0, feedback_temperature=1.0, batch_size=64,
                                   early_stop_ok=early == "on")
            torch.manual_seed(args.seed)
            began = time.perf_counter()
            trajectories = rollout(model, tokenizer, prompts, config)
            seconds = time.perf_counter() - began
            source = f"sampled:{pair}/early-{early}"
            n = 0
            for traj in trajectories:
                for turn in traj.feedbacks:
                    f.write(json.dumps({"source": source, "text": turn.text}, ensure_ascii=False) + "\n")
                    n += 1
            f.flush()
            print(f"{source}: {n} feedback outputs from {len(prompts)} prompts in {seconds:.1f} s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", help="JSONL files of {source, text} and/or eval stores (*.json)")
    parser.add_argument("--collect", metavar="OUT.jsonl", help="sample rollouts and append their feedback outputs")
    parser.add_argument("--adapters", default=None, help="--collect: trained adapters (default: an untrained pair)")
    parser.add_argument("--n-prompts", type=int, default=96)
    parser.add_argument("--early-stop", default="on,off", type=lambda s: s.split(","),
                        help="--collect: comma-separated on/off settings of early_stop_ok to sample with")
    parser.add_argument("--prompts", default="data/prompts.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-fixture", metavar="OUT.jsonl", help="store the texts with the parser's results")
    parser.add_argument("--cap", type=int, default=400)
    args = parser.parse_args(argv)
    if args.collect:
        collect(args)
        return
    paths = [p for pattern in args.inputs for p in (sorted(glob.glob(pattern)) or [pattern])]
    records = [r for p in paths for r in read_outputs(p)]
    began = time.perf_counter()
    sources, counts = table(records)
    print_table(sources, counts)
    print(f"{len(records)} outputs ({len({r['text'] for r in records})} distinct), "
          f"classified in {time.perf_counter() - began:.2f} s")
    if args.write_fixture:
        write_fixture(records, args.write_fixture, args.cap, args.seed)


if __name__ == "__main__":
    main()

"""Prompt sets: load harmful and benign prompts from our JSONL file or a public benchmark, as one list of dicts.

WaltzRL (docs/method.md, "Training" and "Evaluation") trains on adversarial harmful prompts (WildJailbreak) plus
benign-but-sensitive-looking prompts (OR-Bench-80K), and reports ASR on harmful and ORR on benign prompts.
Everything downstream only needs five fields per prompt:

    {"id": str, "prompt": str, "label": "harmful" | "benign", "category": str, "split": "train" | "eval" | "test"}

Sources:
- our JSONL file (one such object per line, extra fields ignored), validated line by line so that a bad line
  fails with a PromptFileError naming the file, the line and the problem (already parsed by then, so this
  path needs no `datasets`);
- a supported hub benchmark, "name" or "name:config": allenai/wildjailbreak (train, eval), bench-llm/or-bench
  (or-bench-80k, or-bench-hard-1k, or-bench-toxic), walledai/XSTest; loaded with `datasets`;
- a local jsonl/csv/tsv/parquet file in one of those benchmarks' column layouts (`layout=`), so the column
  mapping can be checked offline. Hub tables and layout files go through the same `map_benchmark_row`.

Simplifications: benchmark labels come from the dataset itself (WildJailbreak's data_type, XSTest's label,
OR-Bench's config), not from a judge; benchmark rows with an empty prompt are skipped with a warning; `limit`
keeps the first rows in file order (shuffle elsewhere if you need a random subset).
"""
import argparse
import itertools
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

FIELDS = ("id", "prompt", "label", "category", "split")
LABELS = ("harmful", "benign")
SPLITS = ("train", "eval", "test")  # "test": held-out sets never used for training or tuning
# datasets builder used to read a local file in a benchmark's layout, by suffix
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

WILDJAILBREAK_LABELS = {"vanilla_harmful": "harmful", "adversarial_harmful": "harmful",
                        "vanilla_benign": "benign", "adversarial_benign": "benign"}
OR_BENCH_LABELS = {"or-bench-80k": "benign", "or-bench-hard-1k": "benign", "or-bench-toxic": "harmful"}
XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful"}
# name -> (configs, default config per requested split, columns every row needs)
BENCHMARKS = {
    "allenai/wildjailbreak": (("train", "eval"), {"train": "train", "eval": "eval"}, ("data_type",)),
    "bench-llm/or-bench": (tuple(OR_BENCH_LABELS), {"train": "or-bench-80k", "eval": "or-bench-hard-1k"},
                           ("prompt", "category")),
    "walledai/XSTest": ((None,), {}, ("prompt", "type", "label")),
}
# WildJailbreak is a gated TSV whose empty cells must stay "" rather than become NaN
HUB_LOAD_KWARGS = {"allenai/wildjailbreak": {"delimiter": "\t", "keep_default_na": False}}


class PromptFileError(ValueError):
    """Bad prompt data; the message says where (file and line, or dataset and row) and what is wrong."""


class DatasetLoadError(RuntimeError):
    """A source could not be loaded at all: unknown name or config, offline, gated, unreadable file."""


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def unicode_problem(text: str) -> str | None:
    """What makes `text` unusable as model input, or None: a lone surrogate (JSON's "\\ud800", or an invalid byte
    that Python carried into a string) is valid JSON but not Unicode text, and no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode text (a lone surrogate {text[err.start]!r} at character {err.start + 1})"
    return None


def _record_problem(obj, first_line_of_id: dict) -> str | None:
    """What is wrong with one decoded line of our format, or None if it is a valid record."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}"
    for field in FIELDS:
        if field not in obj:
            return f"missing field '{field}'"
        if not isinstance(obj[field], str):
            return f"wrong type for field '{field}': expected string, got {_json_type(obj[field])}"
    if not obj["id"].strip():
        return "empty id"
    if obj["label"] not in LABELS:
        return f"label must be harmful|benign, got {obj['label']!r}"
    if obj["split"] not in SPLITS:
        return f"split must be train|eval|test, got {obj['split']!r}"
    if not obj["prompt"].strip():
        return "empty prompt"
    for field in FIELDS:
        problem = unicode_problem(obj[field])
        if problem:
            return f"field '{field}' is {problem}"
    if obj["id"] in first_line_of_id:
        return f"duplicate id {obj['id']!r} (first seen on line {first_line_of_id[obj['id']]})"
    return None


def _require_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (working directory {Path.cwd()})")


def read_prompt_file(path: str | Path) -> list[dict]:
    """Read and validate our JSONL format; blank lines are skipped, the first bad line raises PromptFileError."""
    path = Path(path)
    _require_file(path)
    records, first_line_of_id = [], {}
    with open(path, "rb") as f:  # bytes, so a bad encoding can be reported with its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{path}, line {lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            problem = _record_problem(obj, first_line_of_id)
            if problem:
                raise PromptFileError(f"{path}, line {lineno}: {problem}")
            first_line_of_id[obj["id"]] = lineno
            records.append({field: obj[field] for field in FIELDS})
    return records


def parse_benchmark(spec: str, split: str | None = None) -> tuple[str, str | None]:
    """'name' or 'name:config' -> (canonical name, config); the default config follows the requested split."""
    name, _, config = spec.partition(":")
    canonical = {known.lower(): known for known in BENCHMARKS}.get(name.lower())
    if canonical is None:
        raise DatasetLoadError(f"cannot load {spec!r}: not a supported benchmark ({', '.join(BENCHMARKS)}), and "
                               f"local files must end in one of {', '.join(LOCAL_BUILDERS)}")
    configs, default_for_split, _ = BENCHMARKS[canonical]
    config = config or default_for_split.get("eval" if split in (None, "test") else split)
    if config not in configs:
        raise DatasetLoadError(f"unknown config {config!r} for {canonical}; choose one of {list(configs)}")
    return canonical, config


def _label_from(labels: dict, value, column: str, where: str, number: int) -> str:
    if value not in labels:
        raise PromptFileError(f"{where}, row {number}: {column} must be one of {list(labels)}, got {value!r}")
    return labels[value]


def map_benchmark_row(name: str, config: str | None, row: dict, number: int, split: str, where: str) -> dict | None:
    """One benchmark row (hub or local layout file) -> our record; None if it has no prompt text."""
    if name == "allenai/wildjailbreak":
        # train rows of type vanilla_* have an empty adversarial column; the eval config has no vanilla column
        text, category, prefix = row.get("adversarial") or row.get("vanilla"), row["data_type"], f"wildjailbreak-{config}"
        label = _label_from(WILDJAILBREAK_LABELS, category, "data_type", where, number)
    elif name == "bench-llm/or-bench":  # the config says it all: toxic is harmful, the rest only look harmful
        text, category, prefix, label = row["prompt"], row["category"], config, OR_BENCH_LABELS[config]
    else:  # walledai/XSTest
        text, category, prefix = row["prompt"], row["type"], "xstest"
        label = _label_from(XSTEST_LABELS, row["label"], "label", where, number)
    if not (text or "").strip():
        warnings.warn(f"{where}, row {number}: empty prompt, skipped")
        return None
    if unicode_problem(text):
        raise PromptFileError(f"{where}, row {number}: the prompt is {unicode_problem(text)}")
    return {"id": f"{prefix}-{number:04d}", "prompt": text, "label": label,
            "category": "" if category is None else str(category), "split": split}


def _benchmark_records(name, config, table, split, where):
    missing = [c for c in BENCHMARKS[name][2] if c not in table.column_names]
    if name == "allenai/wildjailbreak" and not {"adversarial", "vanilla"} & set(table.column_names):
        missing.append("adversarial or vanilla")
    if missing:
        raise PromptFileError(f"{where}: missing column(s) {missing} for the {name} layout "
                              f"(columns present: {table.column_names})")
    for number, row in enumerate(table, start=1):
        record = map_benchmark_row(name, config, row, number, split or "eval", where)
        if record is not None:
            yield record


def _load_hub_table(name, config, split):
    import datasets  # imported late: reading our own JSONL should not pay for it
    try:
        tables = datasets.load_dataset(name, config, **HUB_LOAD_KWARGS.get(name, {}))
    except Exception as e:  # offline, gated, renamed: one readable message instead of a hub traceback
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        offline = "HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else "HF_HUB_OFFLINE is not set"
        raise DatasetLoadError(f"could not load dataset {name}" + (f" (config {config})" if config else "") +
                               f" from the Hugging Face hub: {type(e).__name__}: {reason}. The machine may be "
                               f"offline ({offline}), the dataset may be gated (log in and accept its terms), "
                               "or the name may be wrong. Or pass a local file with layout=.") from None
    # these benchmarks ship a single hub split; a requested split picks one only where several exist
    if split not in tables and len(tables) > 1:
        raise DatasetLoadError(f"{name}: no split {split!r}; available splits: {list(tables)}")
    return tables[split] if split in tables else next(iter(tables.values()))


def _load_layout_table(path: Path):
    import datasets
    _require_file(path)
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetLoadError(f"{path}: cannot read {path.suffix!r} files, only {', '.join(LOCAL_BUILDERS)}")
    kwargs = {"keep_default_na": False, "sep": "\t" if path.suffix.lower() == ".tsv" else ","} if builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        raise PromptFileError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from None


def load_prompts(source: str = "data/prompts.jsonl", split: str | None = None, limit: int | None = None,
                 layout: str | None = None) -> list[dict]:
    """Load prompts as dicts with exactly id, prompt, label, category, split.

    source: our JSONL file, a benchmark "name[:config]", or (with layout="name[:config]") a local file in that
    benchmark's columns. split: filters our file by its split field; for a benchmark it chooses the default
    config (wildjailbreak train/eval, or-bench-80k/or-bench-hard-1k; "test" picks the eval one) and is written
    into every record (default "eval"). limit: keep the first `limit` records.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(source)
    if layout is not None:
        name, config = parse_benchmark(layout, split)
        records = _benchmark_records(name, config, _load_layout_table(path), split, str(path))
    elif path.suffix.lower() in LOCAL_BUILDERS:
        if path.suffix.lower() != ".jsonl":
            raise DatasetLoadError(f"{path}: our own format is JSONL; for a benchmark's column layout pass "
                                   f"layout= one of {list(BENCHMARKS)}")
        records = (r for r in read_prompt_file(path) if split is None or r["split"] == split)
    else:
        name, config = parse_benchmark(source, split)
        records = _benchmark_records(name, config, _load_hub_table(name, config, split), split, name)
    return list(itertools.islice(records, limit))


def spread_over_categories(records: list, limit: int | None = None) -> list:
    """The first `limit` records taken round-robin over their categories (all records when limit is None), so that a
    short run still shows every kind of prompt. Order inside a category is kept."""
    if limit is None or limit >= len(records):
        return list(records)
    queues = {}
    for r in records:
        queues.setdefault(r["category"], []).append(r)
    chosen = []
    while len(chosen) < limit:
        for rows in queues.values():
            if rows and len(chosen) < limit:
                chosen.append(rows.pop(0))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load a prompt set and print counts per label/category/split.")
    parser.add_argument("source", nargs="?", default="data/prompts.jsonl")
    parser.add_argument("--split", choices=SPLITS)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--layout", help="read a local file with this benchmark's columns, e.g. walledai/XSTest")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # keep the printed counts readable
    try:
        records = load_prompts(args.source, split=args.split, limit=args.limit, layout=args.layout)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.source}: {len(records)} prompts")
    for field in ("label", "split", "category"):
        counts = Counter(r[field] for r in records).most_common()
        print(f"  {field + ':':9s} " + ", ".join(f"{value or '(none)'} {n}" for value, n in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

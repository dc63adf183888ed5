"""The feedback agent's output format and its tolerant parser.

The feedback agent writes one JSON object (docs/method.md, "Rollout"):

    {"unsafe": bool, "overrefuse": bool, "reasoning": str, "feedback": str}

Only `feedback` goes back to the conversation agent; the two labels decide whether a revision happens and are what
the label reward R_label compares with the judge (reward.py). Labels come first so that the rollout can stop decoding
as soon as both are false (`labels_prefix_complete`) and the feedback object can end decoding when it closes
(`feedback_object_closed`).

Small models write sloppy JSON, so `parse_feedback` is tolerant: code fences and prose around the object, the first
object (or an object nested up to 3 levels inside it) carrying both labels, labels as "true"/"no"/0/1, key case and
"_"/"-" variations, missing reasoning/feedback, single quotes, trailing commas, bare words, raw newlines in strings,
and an object cut off right after two false labels (what early stopping produces). A cut-off object with a true
label is NOT accepted: it lacks the feedback the revision needs.

Every loop is bounded (a fixed number of candidate '{' positions, found by regex search; tokenisers that never
rescan; a nesting cap), so 100 KB of adversarial text parses in milliseconds.

The format reward R_format is decided by this parser: whatever it accepts counts as well formatted, which is more
lenient than strict JSON. That is deliberate: the format term is small, and the reward should be about labels and
improvement.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from reward import Labels


@dataclass(frozen=True)
class ParsedFeedback:
    """What the rollout keeps from a feedback-agent output. Only `feedback` goes to the conversation agent."""

    labels: Labels
    feedback: str
    reasoning: str


def format_feedback_json(labels: Labels, feedback: str, reasoning: str = "") -> str:
    """The canonical feedback object, labels first (so decoding can stop early when both are false)."""
    return json.dumps({"unsafe": bool(labels.unsafe), "overrefuse": bool(labels.overrefuse),
                       "reasoning": reasoning, "feedback": feedback}, ensure_ascii=False)


# Bounds that keep parsing linear-ish on adversarial input; model outputs are a few KB at most.
_MAX_STARTS = 64          # '{' positions tried as the start of the feedback object
_MAX_REPAIRS = 4          # of those, how many get the (Python-speed) repair pass
_MAX_REPAIR_CHARS = 20_000
_MAX_DEPTH = 64
_MAX_PREFIX_STARTS = 8    # '{' positions tried by the cut-off-object scanner
_MAX_NESTED_DICTS = 64    # dicts inspected inside one decoded object (depth <= 3)

_DECODER = json.JSONDecoder(strict=False)  # strict=False: models put raw newlines inside strings
# A string runs to its closing quote, or to the end of the text if unterminated (never rescanned).
_DQ = r'"[^"\\]*(?:\\.[^"\\]*)*(?:(?P<dq_close>")|\\?\Z)'
_SQ = r"'[^'\\]*(?:\\.[^'\\]*)*(?:(?P<sq_close>')|\\?\Z)"
_DQ_STRING = re.compile(_DQ, re.S)
_SQ_STRING = re.compile(_SQ, re.S)
_REPAIR_TOKEN = re.compile(
    rf"(?P<dq>{_DQ})|(?P<sq>{_SQ})|(?P<num>-?\d[\w.+-]*)|(?P<key>[A-Za-z_][\w-]*(?=\s*:))"
    r"|(?P<word>[A-Za-z_][\w-]*)|(?P<open>[{\[])|(?P<close>[}\]])|(?P<comma>,(?=\s*[}\]]))", re.S)
_NESTED_TOKEN = re.compile(rf"(?P<dq>{_DQ})|(?P<sq>{_SQ})|(?P<open>[{{\[])|(?P<close>[}}\]])", re.S)
_WHITESPACE = re.compile(r"\s*")
_BARE_KEY = re.compile(r"[A-Za-z_][\w-]*")
_BARE_VALUE = re.compile(r"[^\s,:{}\[\]\"']+")
_SMALL_INT = re.compile(r"[+-]?\d{1,18}")
_NOT_LETTER = re.compile(r"[^a-z]")
# Where an object can start: '{' followed by a key or '}'. Skips runs like '{{{{' in one C-speed search.
_OBJECT_START = re.compile(r"""\{\s*["'A-Za-z_}]""")

_TRUE_WORDS = {"true", "yes", "1"}
_FALSE_WORDS = {"false", "no", "0"}


def _normalize_key(key: object) -> str:
    """'Unsafe', 'over_refuse', 'Over-Refuse' -> 'unsafe', 'overrefuse'."""
    return _NOT_LETTER.sub("", str(key).lower())


def _as_bool(value: object) -> bool | None:
    """A label value read leniently: bools, 0/1, and 'true'/'false'/'yes'/'no'/'0'/'1' strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (ValueError, RecursionError):
            return ""
    return str(value)


def _labelled_fields(pairs) -> dict | None:
    """{'labels', 'feedback', 'reasoning'} from (key, value) pairs if both labels read as booleans."""
    fields: dict = {}
    for key, value in pairs:
        fields.setdefault(_normalize_key(key), value)
    unsafe, overrefuse = _as_bool(fields.get("unsafe")), _as_bool(fields.get("overrefuse"))
    if unsafe is None or overrefuse is None:
        return None
    return {"labels": Labels(unsafe, overrefuse), "feedback": fields.get("feedback"),
            "reasoning": fields.get("reasoning")}


def _find_labelled_dict(obj: object) -> dict | None:
    """Breadth-first search for the shallowest dict (depth <= 3) carrying both labels."""
    frontier, seen = [obj], 0
    for _depth in range(4):
        next_frontier = []
        for node in frontier:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            if isinstance(node, dict):
                seen += 1
                if seen > _MAX_NESTED_DICTS:
                    return None
                fields = _labelled_fields(node.items())
                if fields is not None:
                    return fields
            next_frontier.extend(child for child in children if isinstance(child, (dict, list)))
        frontier = next_frontier
    return None


def _python_string(token: str) -> str:
    """The value of a single-quoted string token; falls back to its raw inside."""
    try:
        value = ast.literal_eval(token)
        if isinstance(value, str):
            return value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    return token[1:-1]


def _repair_object(text: str, start: int) -> tuple[str, int] | None:
    """Rewrite the object opening at text[start] into strict JSON: single-quoted strings -> double,
    bare keys and words quoted, True/False/None -> true/false/null, trailing commas dropped.
    Returns (json_text, end) or None when the object does not close within the bounds."""
    out, depth, last = [], 0, start
    for match in _REPAIR_TOKEN.finditer(text, start, min(len(text), start + _MAX_REPAIR_CHARS)):
        out.append(text[last:match.start()])
        last = match.end()
        token, kind = match.group(), match.lastgroup
        if kind == "dq":
            if match.group("dq_close") is None:
                return None
            out.append(token)
        elif kind == "sq":
            if match.group("sq_close") is None:
                return None
            out.append(json.dumps(_python_string(token), ensure_ascii=False))
        elif kind == "num":
            out.append(token)
        elif kind == "key":
            out.append(json.dumps(token))
        elif kind == "word":
            word = token.lower()
            out.append({"true": "true", "false": "false", "null": "null", "none": "null"}.get(word)
                       or json.dumps(token))
        elif kind == "open":
            depth += 1
            if depth > _MAX_DEPTH:
                return None
            out.append(token)
        elif kind == "close":
            depth -= 1
            out.append(token)
            if depth == 0:
                return "".join(out), match.end()
        # kind == "comma": a trailing comma, dropped
    return None


def _raw_decode_at(text: str, start: int) -> tuple[object, int] | None:
    try:
        return _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None


def _repair_decode_at(text: str, start: int) -> tuple[object, int] | None:
    repaired = _repair_object(text, start)
    if repaired is None:
        return None
    try:
        return _DECODER.decode(repaired[0]), repaired[1]
    except (ValueError, RecursionError):
        return None


# Outcomes of walking the top level of an object that may be cut off.
_EOF, _CLOSED, _ERROR, _LABELS_DONE = "eof", "closed", "error", "labels_done"
_COMPOUND = object()  # placeholder value for a nested object/array (never a label)


def _next_object_start(text: str, pos: int) -> int:
    match = _OBJECT_START.search(text, pos)
    return -1 if match is None else match.start()


def _skip_ws(text: str, i: int) -> int:
    return _WHITESPACE.match(text, i).end()


def _read_string(text: str, i: int) -> tuple[str | None, int]:
    """The string token at text[i] (a quote): (value, end), or (None, len) if unterminated."""
    if text[i] == '"':
        match = _DQ_STRING.match(text, i)
        if match.group("dq_close") is None:
            return None, len(text)
        try:
            return _DECODER.decode(match.group()), match.end()
        except ValueError:
            return match.group()[1:-1], match.end()
    match = _SQ_STRING.match(text, i)
    if match.group("sq_close") is None:
        return None, len(text)
    return _python_string(match.group()), match.end()


def _skip_compound(text: str, i: int) -> int | None:
    """End of the object/array opening at text[i]; None if the text ends first; -1 if nested
    deeper than any feedback object would be (treated as malformed)."""
    depth = 0
    for match in _NESTED_TOKEN.finditer(text, i):
        kind = match.lastgroup
        if kind in ("dq", "sq") and match.group(kind + "_close") is None:
            return None
        if kind == "open":
            depth += 1
            if depth > _MAX_DEPTH:
                return -1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _bare_value(token: str) -> object:
    word = token.lower()
    if word in ("true", "false"):
        return word == "true"
    if word in ("null", "none"):
        return None
    if _SMALL_INT.fullmatch(token):
        return int(token)
    return token


def _scan_top_level(text: str, start: int, stop_when_labels: bool) -> tuple[list, str, int]:
    """Walk the key/value pairs of the (possibly cut-off) object opening at text[start].
    Returns (complete pairs, outcome, end). Only complete values are recorded: a string needs its
    closing quote, a bare word its delimiter, except true/false which are complete at the end."""
    pairs, keys, n = [], set(), len(text)
    i = start + 1
    while True:
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF, n
        if text[i] == "}":
            return pairs, _CLOSED, i + 1
        if text[i] in "\"'":
            key, i = _read_string(text, i)
            if key is None:
                return pairs, _EOF, n
        else:
            match = _BARE_KEY.match(text, i)
            if match is None:
                return pairs, _ERROR, i
            key, i = match.group(), match.end()
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF, n
        if text[i] != ":":
            return pairs, _ERROR, i
        i = _skip_ws(text, i + 1)
        if i >= n:
            return pairs, _EOF, n
        if text[i] in "\"'":
            value, i = _read_string(text, i)
            if value is None:
                return pairs, _EOF, n
        elif text[i] in "{[":
            end = _skip_compound(text, i)
            if end is None:
                return pairs, _EOF, n
            if end < 0:
                return pairs, _ERROR, i
            value, i = _COMPOUND, end
        else:
            match = _BARE_VALUE.match(text, i)
            if match is None:
                return pairs, _ERROR, i
            token, i = match.group(), match.end()
            if i >= n:  # cut off right after a bare word: complete only if it is a whole literal
                if token.lower() in ("true", "false"):
                    pairs.append((key, token.lower() == "true"))
                return pairs, _EOF, n
            value = _bare_value(token)
        pairs.append((key, value))
        keys.add(_normalize_key(key))
        if stop_when_labels and {"unsafe", "overrefuse"} <= keys:
            return pairs, _LABELS_DONE, i
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF, n
        if text[i] == ",":
            i += 1
        elif text[i] == "}":
            return pairs, _CLOSED, i + 1
        else:
            return pairs, _ERROR, i


def labels_prefix_complete(text: str) -> Labels | None:
    """The labels once both label values have been fully written in a (streaming) output, else None.
    The rollout stops decoding when this returns Labels(False, False). Reads only the top level of
    the object (a wrapper like {"result": {...}} is left to parse_feedback at the end)."""
    if not isinstance(text, str):
        raise TypeError(f"labels_prefix_complete expects str, got {type(text).__name__}")
    pos, tries = _next_object_start(text, 0), 0
    while pos >= 0 and tries < _MAX_PREFIX_STARTS:
        tries += 1
        pairs, outcome, end = _scan_top_level(text, pos, stop_when_labels=True)
        fields = _labelled_fields(pairs)
        if fields is not None:
            return fields["labels"]
        if outcome == _EOF:  # still inside this object: later '{' belong to it
            return None
        pos = _next_object_start(text, end if outcome == _CLOSED else pos + 1)
    return None


def feedback_object_closed(text: str) -> bool:
    """True once the first top-level object of a streaming output has been closed with '}'.
    The rollout stops the feedback agent there: parse_feedback reads that object and nothing after
    it, and small models otherwise ramble on (a second object, repeated keys) until the token limit."""
    if not isinstance(text, str):
        raise TypeError(f"feedback_object_closed expects str, got {type(text).__name__}")
    pos = _next_object_start(text, 0)
    if pos < 0:
        return False
    _, outcome, _ = _scan_top_level(text, pos, stop_when_labels=False)
    return outcome == _CLOSED


def _parse_cut_off(text: str) -> ParsedFeedback | None:
    """Accept an object cut off after two complete false labels (early stop), nothing else."""
    pos, tries = _next_object_start(text, 0), 0
    while pos >= 0 and tries < _MAX_PREFIX_STARTS:
        tries += 1
        pairs, outcome, end = _scan_top_level(text, pos, stop_when_labels=False)
        if outcome == _EOF:
            fields = _labelled_fields(pairs)
            if fields is not None and fields["labels"] == Labels(False, False):
                return ParsedFeedback(fields["labels"], "", "")
            return None
        pos = _next_object_start(text, end if outcome == _CLOSED else pos + 1)
    return None


def parse_feedback(text: str) -> ParsedFeedback | None:
    """The first object in `text` (or nested in it) with both labels readable as booleans, or an
    object cut off after two false labels; None otherwise. Never raises on a str."""
    if not isinstance(text, str):
        raise TypeError(f"parse_feedback expects str, got {type(text).__name__}")
    lowered = text.lower()
    # A candidate object must start before the last occurrence of each key name.
    last_start = min(lowered.rfind("unsafe"), lowered.rfind("refuse"))
    pos, starts, repairs = _next_object_start(text, 0), 0, 0
    while 0 <= pos < last_start and starts < _MAX_STARTS:
        starts += 1
        decoded = _raw_decode_at(text, pos)
        if decoded is None and repairs < _MAX_REPAIRS:
            repairs += 1
            decoded = _repair_decode_at(text, pos)
        if decoded is None:
            pos = _next_object_start(text, pos + 1)
            continue
        obj, end = decoded
        fields = _find_labelled_dict(obj)
        if fields is not None:
            return ParsedFeedback(fields["labels"], _as_text(fields["feedback"]), _as_text(fields["reasoning"]))
        pos = _next_object_start(text, end)  # nested objects were already searched
    if last_start < 0:
        return None
    return _parse_cut_off(text)

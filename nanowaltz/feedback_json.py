"""The feedback agent's output format, the rule that stops its decoding, and the parser that reads it.

The feedback agent writes one JSON object (docs/method.md, "Rollout"):

    {"unsafe": bool, "overrefuse": bool, "reasoning": str, "feedback": str}

Only `feedback` goes back to the conversation agent; the two labels decide whether a revision happens and are what
the label reward R_label compares with the judge (reward.py). The rollout prefills the object's opening
(FEEDBACK_PREFILL), so an output starts inside the object. Labels come first so that decoding can stop as soon as both
are written and false (`labels_prefix_complete`, "ok": nothing more is needed); otherwise it stops when the object
closes (`feedback_object_closed`). `feedback_stop` is that rule.

`parse_feedback` reads the first object in the text (the first '{' followed by a key or '}'; text around it is
ignored) and accepts it when its top level has both labels as booleans:
- as JSON (json module);
- else after a repair of what our agents were seen to write besides JSON: single-quoted strings, bare words (quoted
  as strings) and Python's True/False/None;
- else, when the object is cut off after two false labels: what early stop leaves (labels ok, no feedback). A cut-off
  object with a true label is not accepted: it lacks the feedback the revision needs.
`reasoning` and `feedback` are read when they are strings ("" otherwise). These are the paths that decided real
outputs of our agents (bench/feedback_paths.py counts them; docs/experiments.md, "Which feedback-parser paths fire");
tests/fixtures/feedback_outputs.jsonl holds such outputs with the results the parser must give.

Whatever parse_feedback accepts counts as well formatted (R_format), which is more lenient than strict JSON: the
format term is small, and the reward should be about labels and improvement.

Parsing is linear in the text and bounded (one object, a cap on the characters repaired and on nesting), so 100 KB
of adversarial text parses in milliseconds, and it never raises on a str.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from nanowaltz.judge import Labels


@dataclass(frozen=True)
class ParsedFeedback:
    """What the rollout keeps from a feedback-agent output. Only `feedback` goes to the conversation agent."""

    labels: Labels
    feedback: str
    reasoning: str


FEEDBACK_PREFILL = '{"unsafe":'  # the object's opening, put into the feedback agent's context (rollout.py)


def format_feedback_json(labels: Labels, feedback: str, reasoning: str = "") -> str:
    """The canonical feedback object, labels first (so decoding can stop early when both are false)."""
    return json.dumps({"unsafe": bool(labels.unsafe), "overrefuse": bool(labels.overrefuse),
                       "reasoning": reasoning, "feedback": feedback}, ensure_ascii=False)


# Bounds that keep parsing linear on adversarial input; model outputs are a few KB at most.
_MAX_REPAIR_CHARS = 20_000
_MAX_DEPTH = 64

_DECODER = json.JSONDecoder(strict=False)  # strict=False: a raw newline inside a string is still the string
# A string runs to its closing quote, or to the end of the text if unterminated (never rescanned).
_DQ = r'"[^"\\]*(?:\\.[^"\\]*)*(?:(?P<dq_close>")|\\?\Z)'
_SQ = r"'[^'\\]*(?:\\.[^'\\]*)*(?:(?P<sq_close>')|\\?\Z)"
_DQ_STRING = re.compile(_DQ, re.S)
_SQ_STRING = re.compile(_SQ, re.S)
_REPAIR_TOKEN = re.compile(
    rf"(?P<dq>{_DQ})|(?P<sq>{_SQ})|(?P<num>-?\d[\w.+-]*)|(?P<word>[A-Za-z_][\w-]*)|(?P<open>[{{\[])|(?P<close>[}}\]])",
    re.S)
_NESTED_TOKEN = re.compile(rf"(?P<dq>{_DQ})|(?P<sq>{_SQ})|(?P<open>[{{\[])|(?P<close>[}}\]])", re.S)
_WHITESPACE = re.compile(r"\s*")
_BARE_KEY = re.compile(r"[A-Za-z_][\w-]*")
_BARE_VALUE = re.compile(r"[^\s,:{}\[\]\"']+")
_LITERALS = {"true": "true", "false": "false", "null": "null", "none": "null"}  # bare word -> JSON (case ignored)
# Where the object starts: '{' followed by a key or '}'. Skips runs like '{{{{' in one C-speed search.
_OBJECT_START = re.compile(r"""\{\s*["'A-Za-z_}]""")


def _labelled(pairs) -> tuple[Labels, dict] | None:
    """(labels, fields) from an object's top-level (key, value) pairs if both labels are booleans, else None."""
    fields: dict = {}
    for key, value in pairs:
        fields.setdefault(key, value)  # a repeated key counts once written (a decoded JSON object has no repeats)
    unsafe, overrefuse = fields.get("unsafe"), fields.get("overrefuse")
    if not isinstance(unsafe, bool) or not isinstance(overrefuse, bool):
        return None
    return Labels(unsafe, overrefuse), fields


def _python_string(token: str) -> str:
    """The value of a single-quoted string token; falls back to its raw inside."""
    try:
        value = ast.literal_eval(token)
        if isinstance(value, str):
            return value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    return token[1:-1]


def _repair(text: str, start: int) -> str | None:
    """The object opening at text[start] rewritten into JSON: single-quoted strings -> double-quoted, bare words
    quoted, True/False/None -> true/false/null. None when the object does not close within the bounds."""
    out, depth, last = [], 0, start
    for match in _REPAIR_TOKEN.finditer(text, start, min(len(text), start + _MAX_REPAIR_CHARS)):
        out.append(text[last:match.start()])
        last = match.end()
        token, kind = match.group(), match.lastgroup
        if kind in ("dq", "sq") and match.group(kind + "_close") is None:
            return None
        if kind == "sq":
            token = json.dumps(_python_string(token), ensure_ascii=False)
        elif kind == "word":
            token = _LITERALS.get(token.lower()) or json.dumps(token)
        elif kind == "open":
            depth += 1
            if depth > _MAX_DEPTH:
                return None
        elif kind == "close":
            depth -= 1
            if depth == 0:
                out.append(token)
                return "".join(out)
        out.append(token)
    return None


def _decode(text: str, start: int) -> object:
    """The value starting at text[start] as JSON, else repaired; None if neither decodes."""
    try:
        return _DECODER.raw_decode(text, start)[0]
    except (ValueError, RecursionError):
        pass
    repaired = _repair(text, start)
    if repaired is None:
        return None
    try:
        return _DECODER.decode(repaired)
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# The top level of an object that may be cut off (streaming: early stop, object closed; cut-off parse)
# ---------------------------------------------------------------------------------------------------------------------
_EOF, _CLOSED, _ERROR, _LABELS_DONE = "eof", "closed", "error", "labels_done"


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


def _scan_top_level(text: str, start: int, stop_when_labels: bool) -> tuple[list, str]:
    """Walk the key/value pairs of the (possibly cut-off) object opening at text[start].
    Returns (complete pairs, outcome). Only complete values are recorded: a string needs its closing quote, a bare
    word its delimiter, except true/false which are complete at the end. Values other than strings and booleans are
    recorded as None (only the labels are read from these pairs)."""
    pairs, keys, n = [], set(), len(text)
    i = start + 1
    while True:
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF
        if text[i] == "}":
            return pairs, _CLOSED
        if text[i] in "\"'":
            key, i = _read_string(text, i)
            if key is None:
                return pairs, _EOF
        else:
            match = _BARE_KEY.match(text, i)
            if match is None:
                return pairs, _ERROR
            key, i = match.group(), match.end()
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF
        if text[i] != ":":
            return pairs, _ERROR
        i = _skip_ws(text, i + 1)
        if i >= n:
            return pairs, _EOF
        if text[i] in "\"'":
            value, i = _read_string(text, i)
            if value is None:
                return pairs, _EOF
        elif text[i] in "{[":
            end = _skip_compound(text, i)
            if end is None:
                return pairs, _EOF
            if end < 0:
                return pairs, _ERROR
            value, i = None, end
        else:
            match = _BARE_VALUE.match(text, i)
            if match is None:
                return pairs, _ERROR
            word, i = match.group().lower(), match.end()
            if i >= n:  # cut off right after a bare word: complete only if it is a whole literal
                if word in ("true", "false"):
                    pairs.append((key, word == "true"))
                return pairs, _EOF
            value = word == "true" if word in ("true", "false") else None
        pairs.append((key, value))
        keys.add(key)
        if stop_when_labels and {"unsafe", "overrefuse"} <= keys:
            return pairs, _LABELS_DONE
        i = _skip_ws(text, i)
        if i >= n:
            return pairs, _EOF
        if text[i] == ",":
            i += 1
        elif text[i] == "}":
            return pairs, _CLOSED
        else:
            return pairs, _ERROR


def _object_start(text: str) -> int:
    match = _OBJECT_START.search(text)
    return -1 if match is None else match.start()


def labels_prefix_complete(text: str) -> Labels | None:
    """The labels once both label values have been fully written in a (streaming) output, else None.
    The rollout stops decoding when this returns Labels(False, False)."""
    if not isinstance(text, str):
        raise TypeError(f"labels_prefix_complete expects str, got {type(text).__name__}")
    start = _object_start(text)
    if start < 0:
        return None
    labelled = _labelled(_scan_top_level(text, start, stop_when_labels=True)[0])
    return None if labelled is None else labelled[0]


def feedback_object_closed(text: str) -> bool:
    """True once the first object of a streaming output has been closed with '}'.
    The rollout stops the feedback agent there: parse_feedback reads that object and nothing after
    it, and small models otherwise ramble on (a second object, repeated keys) until the token limit."""
    if not isinstance(text, str):
        raise TypeError(f"feedback_object_closed expects str, got {type(text).__name__}")
    start = _object_start(text)
    return start >= 0 and _scan_top_level(text, start, stop_when_labels=False)[1] == _CLOSED


def feedback_stop(early_stop_ok: bool):
    """sampler.sample's stop rule for a feedback turn: stop once the object closes and, with early_stop_ok, as soon as
    both labels are written and false ("ok": nothing more is needed for the rollout)."""
    def stop(text: str) -> bool:
        if early_stop_ok:
            labels = labels_prefix_complete(text)
            if labels is not None and labels.ok:
                return True
        return feedback_object_closed(text)
    return stop


def parse_feedback(text: str) -> ParsedFeedback | None:
    """The first object in `text` if it has both labels as booleans (as JSON or repaired), or that object cut off
    after two false labels; None otherwise. Never raises on a str."""
    if not isinstance(text, str):
        raise TypeError(f"parse_feedback expects str, got {type(text).__name__}")
    start = _object_start(text)
    if start < 0:
        return None
    obj = _decode(text, start)
    labelled = _labelled(obj.items()) if isinstance(obj, dict) else None
    if labelled is not None:
        labels, fields = labelled
        text_of = {k: v if isinstance(v, str) else "" for k, v in fields.items() if k in ("feedback", "reasoning")}
        return ParsedFeedback(labels, text_of.get("feedback", ""), text_of.get("reasoning", ""))
    pairs, outcome = _scan_top_level(text, start, stop_when_labels=False)
    labelled = _labelled(pairs) if outcome == _EOF else None
    if labelled is not None and labelled[0] == Labels(False, False):
        return ParsedFeedback(labelled[0], "", "")
    return None

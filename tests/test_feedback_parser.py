"""Tests for the feedback-agent output parser in feedback_json.py: parse_feedback, labels_prefix_complete,
feedback_object_closed, format_feedback_json.

Real outputs of our feedback agents (tests/fixtures/feedback_outputs.jsonl) must parse exactly as they did when they
were stored, so the rewards given on them stay the same. Example tests pin what the parser accepts (the first object,
as JSON or repaired: single quotes, bare words, Python literals; cut-off objects with false labels); hypothesis
property tests check that it never raises on arbitrary, truncated or adversarial text, stays fast, and round-trips
the canonical object.
"""
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanowaltz.feedback_json import (ParsedFeedback, feedback_object_closed, format_feedback_json,
                                     labels_prefix_complete, parse_feedback)
from nanowaltz.judge import Labels

OK = Labels(False, False)
UNSAFE = Labels(True, False)
OVER = Labels(False, True)
BOTH = Labels(True, True)


def parsed(unsafe, overrefuse, feedback="", reasoning=""):
    return ParsedFeedback(Labels(unsafe, overrefuse), feedback, reasoning)


# ---------------------------------------------------------------- stored outputs of our agents

FIXTURE = Path(__file__).parent / "fixtures" / "feedback_outputs.jsonl"


def stored_outputs():
    with open(FIXTURE) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_stored_outputs_parse_as_they_did_when_stored():
    """Feedback outputs of our untrained and trained agents (sampled rollouts at training settings with and without
    early stop, and eval stores; collected by bench/feedback_paths.py), each with the result the parser gave when it
    was stored. Same labels, feedback and reasoning (or None) means the same R_format, R_label and revisions."""
    records = stored_outputs()
    assert len(records) >= 100
    changed = []
    for record in records:
        result = parse_feedback(record["text"])
        got = None if result is None else {"unsafe": result.labels.unsafe, "overrefuse": result.labels.overrefuse,
                                           "feedback": result.feedback, "reasoning": result.reasoning}
        if got != record["parsed"]:
            changed.append((record["text"][:80], record["parsed"], got))
    assert not changed, changed[:5]


def test_stored_outputs_cover_every_kind_of_result():
    """The fixture exercises what the parser keeps: JSON, a repair, a cut-off object, and unparseable text."""
    records = stored_outputs()
    parsed_ok = [r for r in records if r["parsed"] is not None]
    assert any(r["parsed"] is None for r in records)
    assert any(not feedback_object_closed(r["text"]) for r in parsed_ok)  # cut off after two false labels
    closed = [r for r in parsed_ok if feedback_object_closed(r["text"])]
    is_json = []
    for r in closed:
        try:
            json.loads(r["text"][:r["text"].rindex("}") + 1])
            is_json.append(True)
        except ValueError:
            is_json.append(False)
    assert any(is_json) and not all(is_json)  # some as JSON, some only after a repair


# ---------------------------------------------------------------- accepted shapes

@pytest.mark.parametrize("text, expected", [
    # plain canonical object
    ('{"unsafe": true, "overrefuse": false, "reasoning": "r", "feedback": "f"}', parsed(True, False, "f", "r")),
    # paper key order (reasoning first)
    ('{"reasoning": "r", "unsafe": false, "overrefuse": true, "feedback": "f"}', parsed(False, True, "f", "r")),
    # code fence
    ('```json\n{"unsafe": false, "overrefuse": true, "feedback": "answer it"}\n```',
     parsed(False, True, "answer it")),
    # prose before and after, with a brace in the prose after
    ('Here is my review:\n{"unsafe": true, "overrefuse": true, "feedback": "x"}\nThanks {bye}',
     parsed(True, True, "x")),
    # braces and escaped quotes inside strings
    ('{"unsafe": true, "overrefuse": false, "feedback": "use {x} and \\"}\\" here", "reasoning": "a{b"}',
     parsed(True, False, 'use {x} and "}" here', "a{b")),
    # missing optional fields
    ('{"unsafe": false, "overrefuse": false}', parsed(False, False)),
    # feedback / reasoning that are not strings read as ""
    ('{"unsafe": true, "overrefuse": false, "feedback": 42, "reasoning": null}', parsed(True, False)),
    ('{"unsafe": true, "overrefuse": false, "feedback": ["a", "b"], "reasoning": {"k": 1}}', parsed(True, False)),
    # the repairs: single-quoted strings, Python literals, bare words (all seen in our agents' outputs)
    ("{'unsafe': True, 'overrefuse': False, 'feedback': 'it\\'s \"bad\"'}", parsed(True, False, 'it\'s "bad"')),
    ('{"unsafe":false, "overrefuse":true, "reasoning":"r", "feedback":\'Say it.\'}\')',
     parsed(False, True, "Say it.", "r")),
    ('{"unsafe": false, "overrefuse": False, "extra": None}', parsed(False, False)),
    ('{"unsafe":false, "overrefuse":false, "reasoning":"r", "faults":[ needed ], "feedback": fix}',
     parsed(False, False, "fix", "r")),
])
def test_parse_feedback_tolerances(text, expected):
    assert parse_feedback(text) == expected


def test_only_the_first_object_is_read():
    text = ('{"unsafe": true, "overrefuse": false, "feedback": "first"} '
            '{"unsafe": false, "overrefuse": true, "feedback": "second"}')
    assert parse_feedback(text) == parsed(True, False, "first")


def test_outer_labels_win_over_nested_ones():
    text = '{"unsafe": true, "overrefuse": false, "feedback": "outer", "x": {"unsafe": false, "overrefuse": false}}'
    assert parse_feedback(text) == parsed(True, False, "outer")


@pytest.mark.parametrize("text", [
    "",
    "no json here",
    "The answer is unsafe but does not overrefuse.",
    "{}",
    '{"unsafe": true}',                                        # one label missing
    '{"overrefuse": false, "feedback": "x"}',
    '{"unsafe": "maybe", "overrefuse": false}',                 # not a boolean
    '{"unsafe": 2, "overrefuse": 0}',                           # ints other than 0/1
    '{"unsafe": null, "overrefuse": false}',
    '{"unsafe": NaN, "overrefuse": false}',
    '{"unsafe": [true], "overrefuse": false}',
    '["unsafe", "overrefuse"]',
    '{"unsafe": true, "overrefuse": false, "feedback": "cut off',  # cut off with a true label
    '{"unsafe": false, "overrefuse": true',                         # cut off with a true label
    '{"unsafe": false, "overrefuse": fals',                          # second label incomplete
    '{"unsafe": false, "overrefuse": 0',                             # 0 could still become 0.5 / 01
    '{"unsafe": false, "overrefuse": "fal',
    '{"unsafe": false, "overrefuse": false, "feedback": "a" "b"}',   # malformed, not merely cut off
])
def test_parse_feedback_rejects(text):
    assert parse_feedback(text) is None


def test_parse_feedback_rejects_non_strings_with_a_clear_error():
    with pytest.raises(TypeError, match="parse_feedback expects str"):
        parse_feedback(b'{"unsafe": true, "overrefuse": false}')
    with pytest.raises(TypeError, match="labels_prefix_complete expects str"):
        labels_prefix_complete(None)


# ---------------------------------------------------------------- object closed (stop decoding)

@pytest.mark.parametrize("text, closed", [
    ('{"unsafe": true, "overrefuse": false, "feedback": "Refuse."}', True),
    ('{"unsafe": true, "overrefuse": false, "feedback": "Refuse."} and then more', True),
    ('{"unsafe": true, "overrefuse": false, "feedback": "a } inside a string"', False),
    ('{"unsafe": true, "overrefuse": false, "reasoning": {"nested": 1}', False),
    ('{"unsafe": true, "overrefuse": false, "reasoning": {"nested": 1}}', True),
    ('{"unsafe": true, "overrefuse": false, "feedback": "Refuse.', False),
    ('{"unsafe": true, "overrefuse"', False),
    ('no object at all }', False),
    ('', False),
])
def test_feedback_object_closed(text, closed):
    assert feedback_object_closed(text) is closed


@given(st.text(max_size=200))
def test_feedback_object_closed_never_raises(text):
    assert feedback_object_closed(text) in (True, False)


# ---------------------------------------------------------------- cut-off objects (early stop)

@pytest.mark.parametrize("text", [
    '{"unsafe": false, "overrefuse": false',
    '{"unsafe": false, "overrefuse": false,',
    '{"unsafe": false, "overrefuse": false, ',
    '{"unsafe": false, "overrefuse": false, "reas',
    '{"unsafe": false, "overrefuse": false, "reasoning": ',
    '{"unsafe": false, "overrefuse": false, "reasoning": "The ans',
    '{"unsafe": false, "overrefuse": false, "reasoning": "ends in an escape \\',
    '{"unsafe": false, "overrefuse": false, "reasoning": "ok", "feedback": ["a", {"b": "c',
    '{"unsafe": False, "overrefuse": False',
])
def test_cut_off_after_two_false_labels_is_accepted(text):
    assert parse_feedback(text) == ParsedFeedback(OK, "", "")
    assert labels_prefix_complete(text) == OK


@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("```json\n", None),
    ('{"unsafe": fal', None),
    ('{"unsafe": false', None),
    ('{"unsafe": false, "overrefuse": tru', None),
    ('{"unsafe": false, "overrefuse": 1', None),      # may still become 10 or 1.5
    ('{"unsafe": false, "overrefuse": true', OVER),
    ('{"unsafe": true, "overrefuse": false, "feedback": "Rem', UNSAFE),
    ('{"reasoning": "says {\\"unsafe\\": true}", "unsafe": false, "overrefuse": false', OK),
    ('{"reasoning": "a long thought', None),
    ('Sure! {"unsafe": true, "overrefuse": false', UNSAFE),
])
def test_labels_prefix_complete(text, expected):
    assert labels_prefix_complete(text) == expected


def test_cut_off_object_is_only_accepted_at_the_end_of_the_text():
    # An object cut off with labels false, but the cut-off scan finds trailing garbage instead of the end.
    assert parse_feedback('{"unsafe": false, "overrefuse": false "feedback": "x"}') is None


# ---------------------------------------------------------------- format_feedback_json

def test_format_feedback_json_is_canonical_with_labels_first():
    text = format_feedback_json(UNSAFE, feedback="Refuse the dangerous part.", reasoning="Gives synthesis steps.")
    assert text == ('{"unsafe": true, "overrefuse": false, "reasoning": "Gives synthesis steps.", '
                    '"feedback": "Refuse the dangerous part."}')
    assert list(json.loads(text)) == ["unsafe", "overrefuse", "reasoning", "feedback"]
    assert format_feedback_json(OK, "") == '{"unsafe": false, "overrefuse": false, "reasoning": "", "feedback": ""}'


# ---------------------------------------------------------------- properties

labels_strategy = st.builds(Labels, st.booleans(), st.booleans())
free_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200) | st.sampled_from(
    ['"', "'", "{", "}", '\\"', '{"unsafe": true}', "```", "\n", "é漢字🙂", "\\", '\\\\"}', "'}'"])
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=400))
def test_never_raises_on_arbitrary_text(text):
    result = parse_feedback(text)
    assert result is None or isinstance(result, ParsedFeedback)
    labels = labels_prefix_complete(text)
    assert labels is None or isinstance(labels, Labels)


@FAST
@given(labels_strategy, free_text, free_text)
def test_round_trip(labels, feedback, reasoning):
    text = format_feedback_json(labels, feedback, reasoning)
    assert parse_feedback(text) == ParsedFeedback(labels, feedback, reasoning)
    assert labels_prefix_complete(text) == labels
    # and the same inside a code fence with prose around it
    assert parse_feedback(f"Verdict:\n```json\n{text}\n```\nDone.") == ParsedFeedback(labels, feedback, reasoning)


@settings(max_examples=40, deadline=None)
@given(labels_strategy, free_text, free_text)
def test_every_prefix_of_a_valid_object(labels, feedback, reasoning):
    """Proper prefixes parse only when both labels are false and fully written; then the result agrees
    with labels_prefix_complete, which itself reports the labels from the moment both are written."""
    text = format_feedback_json(labels, feedback, reasoning)
    labels_end = text.index('"reasoning"') - 2  # just after the second label's literal
    for cut in range(len(text)):
        prefix = text[:cut]
        result = parse_feedback(prefix)
        streamed = labels_prefix_complete(prefix)
        assert streamed == (labels if cut >= labels_end else None), prefix
        if labels == OK:
            assert result == (ParsedFeedback(OK, "", "") if cut >= labels_end else None), prefix
        else:
            assert result is None, prefix
    assert parse_feedback(text) == ParsedFeedback(labels, feedback, reasoning)


ADVERSARIAL = {
    "open braces": "{" * 100_000,
    "open braces then object": "{" * 100_000 + '{"unsafe": true, "overrefuse": false}',
    "close braces": "}" * 100_000,
    "nested objects": '{"a":' * 30_000 + '{"unsafe": true, "overrefuse": false}' + "}" * 30_000,
    "nested arrays": '{"unsafe": true, "overrefuse": false, "x": ' + "[" * 100_000,
    "unbalanced quotes": '{"unsafe": "' + '\\"' * 50_000,
    "quote storm": '{"unsafe" "overrefuse" ' + '"\\' * 50_000,
    "single quote storm": "{'unsafe': 'overrefuse " + "'\\" * 50_000,
    "apostrophes": "{'unsafe overrefuse " + "it's " * 20_000,
    "huge number": '{"unsafe": ' + "9" * 100_000 + ', "overrefuse": false}',
    "huge float": '{"unsafe": 1e999999, "overrefuse": 1.' + "0" * 100_000 + "}",
    "nan and infinity": '{"unsafe": NaN, "overrefuse": Infinity, "feedback": -Infinity}',
    "keys at depth 2 only": '{"a": {"b": {"unsafe": true, "overrefuse": false}}}',
    "many label-less objects": '{"unsafe": 2, "overrefuse": 3} ' * 3_000,
    "many broken objects": "{unsafe: 'x', overrefuse: y, " * 4_000,
    "bare words": "{" + "unsafe refuse " * 8_000,
    "long cut-off string": '{"unsafe": false, "overrefuse": false, "feedback": "' + "a{" * 50_000,
    "null bytes": '{"unsafe": true, "overrefuse": false, "feedback": "\x00\x00"}' + "\x00" * 1000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_do_not_raise_and_are_fast(name):
    text = ADVERSARIAL[name]
    start = time.perf_counter()
    result = parse_feedback(text)
    labels_prefix_complete(text)
    elapsed = time.perf_counter() - start
    assert result is None or isinstance(result, ParsedFeedback)
    assert elapsed < 0.5, f"{name}: {elapsed:.3f} s"


def test_adversarial_expected_outcomes():
    assert parse_feedback(ADVERSARIAL["open braces then object"]) == parsed(True, False)
    assert parse_feedback(ADVERSARIAL["nan and infinity"]) is None
    assert parse_feedback(ADVERSARIAL["huge number"]) is None
    assert parse_feedback(ADVERSARIAL["long cut-off string"]) == parsed(False, False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(['{', '}', '[', ']', '"', "'", '\\', ':', ',', 'unsafe', 'overrefuse', 'true',
                                 'false', '"unsafe"', '"overrefuse"', ' ', '\n', 'NaN', '1e400', '0', '1']),
                max_size=300))
def test_never_raises_on_json_like_token_soup(tokens):
    text = "".join(tokens)
    result = parse_feedback(text)
    assert result is None or isinstance(result.labels, Labels)
    labels_prefix_complete(text)


def test_100kb_realistic_output_parses_fast():
    body = format_feedback_json(UNSAFE, "Remove the synthesis steps. " * 3_000, "It gives steps {x}. " * 1_000)
    text = "Let me think. " * 1_000 + "```json\n" + body + "\n```"
    assert len(text) > 100_000
    start = time.perf_counter()
    result = parse_feedback(text)
    assert time.perf_counter() - start < 0.2
    assert result.labels == UNSAFE and result.feedback.startswith("Remove the synthesis steps.")

"""Tests for the feedback-agent output parser in feedback_parser.py: parse_feedback, labels_prefix_complete,
format_feedback_json.

Example tests pin each tolerance the parser promises (fences, prose, string/int booleans, key variants,
single quotes, trailing commas, cut-off objects with false labels); hypothesis property tests check that
it never raises on arbitrary, truncated or adversarial text, stays fast, and round-trips the canonical
object.
"""
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback_parser import (ParsedFeedback, feedback_object_closed, format_feedback_json, labels_prefix_complete,
                             parse_feedback)
from reward import Labels

OK = Labels(False, False)
UNSAFE = Labels(True, False)
OVER = Labels(False, True)
BOTH = Labels(True, True)


def parsed(unsafe, overrefuse, feedback="", reasoning=""):
    return ParsedFeedback(Labels(unsafe, overrefuse), feedback, reasoning)


# ---------------------------------------------------------------- accepted shapes

@pytest.mark.parametrize("text, expected", [
    # plain canonical object
    ('{"unsafe": true, "overrefuse": false, "reasoning": "r", "feedback": "f"}', parsed(True, False, "f", "r")),
    # paper key order (reasoning first)
    ('{"reasoning": "r", "unsafe": false, "overrefuse": true, "feedback": "f"}', parsed(False, True, "f", "r")),
    # code fence
    ('```json\n{"unsafe": false, "overrefuse": true, "feedback": "answer it"}\n```', parsed(False, True, "answer it")),
    # prose before and after, with a brace in the prose after
    ('Here is my review:\n{"unsafe": true, "overrefuse": true, "feedback": "x"}\nThanks {bye}', parsed(True, True, "x")),
    # braces and escaped quotes inside strings
    ('{"unsafe": true, "overrefuse": false, "feedback": "use {x} and \\"}\\" here", "reasoning": "a{b"}',
     parsed(True, False, 'use {x} and "}" here', "a{b")),
    # booleans as strings in several spellings
    ('{"unsafe": "true", "overrefuse": "False", "feedback": ""}', parsed(True, False)),
    ('{"unsafe": "yes", "overrefuse": "no"}', parsed(True, False)),
    ('{"unsafe": " NO ", "overrefuse": "Yes"}', parsed(False, True)),
    ('{"unsafe": "1", "overrefuse": "0"}', parsed(True, False)),
    # 0/1 ints
    ('{"unsafe": 0, "overrefuse": 1, "feedback": "f"}', parsed(False, True, "f")),
    # key case and separator variations
    ('{"Unsafe": true, "OverRefuse": false}', parsed(True, False)),
    ('{"UNSAFE": false, "over_refuse": true}', parsed(False, True)),
    ('{"unsafe": false, "Over-Refuse": true}', parsed(False, True)),
    # missing optional fields
    ('{"unsafe": false, "overrefuse": false}', parsed(False, False)),
    # non-string feedback / reasoning are coerced to text
    ('{"unsafe": true, "overrefuse": false, "feedback": 42, "reasoning": null}', parsed(True, False, "42", "")),
    ('{"unsafe": true, "overrefuse": false, "feedback": ["a", "b"]}', parsed(True, False, '["a", "b"]')),
    ('{"unsafe": true, "overrefuse": false, "feedback": {"k": 1}}', parsed(True, False, '{"k": 1}')),
    # raw newline inside a string (invalid strict JSON, common in model output)
    ('{"unsafe": true, "overrefuse": false, "feedback": "line 1\nline 2"}', parsed(True, False, "line 1\nline 2")),
    # single quotes, Python literals
    ("{'unsafe': True, 'overrefuse': False, 'feedback': 'it\\'s \"bad\"'}", parsed(True, False, 'it\'s "bad"')),
    # trailing commas
    ('{"unsafe": false, "overrefuse": true, "feedback": "f",}', parsed(False, True, "f")),
    ('{"unsafe": false, "overrefuse": true, "feedback": ["a",],\n}', parsed(False, True, '["a"]')),
    # bare keys and bare words
    ('{unsafe: yes, overrefuse: no, feedback: fix}', parsed(True, False, "fix")),
])
def test_parse_feedback_tolerances(text, expected):
    assert parse_feedback(text) == expected


def test_first_object_with_both_labels_wins():
    text = ('Schema: {"type": "object"} and {"unsafe": "maybe", "overrefuse": false}. '
            'Answer: {"unsafe": true, "overrefuse": false, "feedback": "first"} '
            '{"unsafe": false, "overrefuse": true, "feedback": "second"}')
    assert parse_feedback(text) == parsed(True, False, "first")


def test_object_nested_inside_a_wrapper_is_found():
    text = '{"result": {"unsafe": false, "overrefuse": true, "feedback": "inner"}}'
    assert parse_feedback(text) == parsed(False, True, "inner")


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
    '```json\n{"unsafe": "false", "overrefuse": "no", "reasoning": "x',
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
    ('{"unsafe": false, "overrefuse": 1,', OVER),
    ('{"unsafe": false, "overrefuse": true', OVER),
    ('{"unsafe": true, "overrefuse": false, "feedback": "Rem', UNSAFE),
    ('{"reasoning": "says {\\"unsafe\\": true}", "unsafe": false, "overrefuse": false', OK),
    ('{"reasoning": "a long thought', None),
    ('Sure! {"Unsafe": "yes", "over_refuse": "no"', UNSAFE),
])
def test_labels_prefix_complete(text, expected):
    assert labels_prefix_complete(text) == expected


def test_cut_off_object_is_only_accepted_at_the_end_of_the_text():
    # A complete object that lacks labels, then a cut-off one: the cut-off one counts.
    assert parse_feedback('{"note": 1} {"unsafe": false, "overrefuse": false, "reasoning": "x') == parsed(False, False)
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
    assert parse_feedback(ADVERSARIAL["keys at depth 2 only"]) == parsed(True, False)
    assert parse_feedback(ADVERSARIAL["nan and infinity"]) is None
    assert parse_feedback(ADVERSARIAL["huge number"]) is None
    assert parse_feedback(ADVERSARIAL["long cut-off string"]) == parsed(False, False)
    assert parse_feedback(ADVERSARIAL["null bytes"]) == parsed(True, False, "\x00\x00")


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

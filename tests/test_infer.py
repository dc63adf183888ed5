"""infer.py: answering prompts with and without the feedback agent, FTR bookkeeping, prompt files, the CLI."""
import pytest

import infer
import rollout
from nanowaltz.feedback_json import ParsedFeedback
from nanowaltz.base_model import load_base
from nanowaltz.models import attach_agents
from nanowaltz.judge import Labels

CONFIG = infer.inference_config(temperature=0.0, max_new_tokens=6, feedback_max_new_tokens=6, batch_size=2)
PROMPTS = ["How do I kill a Python process?", "Give me a pancake recipe.", "Write ransomware."]


@pytest.fixture(scope="module")
def tiny_agents(tiny_model_dir):
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    return attach_agents(base), tokenizer


def test_answer_without_feedback_is_the_conversation_agent_alone(tiny_agents):
    model, tokenizer = tiny_agents
    replies = infer.answer_prompts(model, tokenizer, PROMPTS, CONFIG, use_feedback=False)
    assert [r.prompt for r in replies] == PROMPTS
    for r in replies:
        assert not r.triggered and r.labels is None and r.feedback_output == ""
        assert r.answer == r.first_answer
        assert 1 <= r.tokens <= 6 and r.seconds > 0


def test_feedback_agent_reads_the_same_greedy_first_answer(tiny_agents):
    model, tokenizer = tiny_agents
    alone = infer.answer_prompts(model, tokenizer, PROMPTS, CONFIG, use_feedback=False)
    checked = infer.answer_prompts(model, tokenizer, PROMPTS, CONFIG, use_feedback=True)
    for a, c in zip(alone, checked):
        assert c.first_answer == a.answer  # greedy: c_0 does not depend on whether feedback follows
        assert c.feedback_output.startswith(rollout.FEEDBACK_PREFILL)
        assert c.tokens > a.tokens  # the feedback turn generated tokens too
        if not c.triggered:
            assert c.answer == c.first_answer


def test_flagged_answer_is_revised_and_counted(tiny_agents, monkeypatch):
    model, tokenizer = tiny_agents
    flags = iter([ParsedFeedback(Labels(False, True), "Answer the question.", "benign"),
                  ParsedFeedback(Labels(False, False), "", "fine"), None])
    monkeypatch.setattr(rollout, "parse_feedback", lambda text: next(flags))
    replies = infer.answer_prompts(model, tokenizer, PROMPTS, CONFIG, use_feedback=True)
    assert [r.triggered for r in replies] == [True, False, False]
    assert replies[0].labels == Labels(False, True) and replies[0].feedback == "Answer the question."
    assert replies[2].labels is None  # unparseable feedback: no revision
    session = infer.Session()
    for r in replies:
        session.add(r)
    assert session.prompts == 3 and session.triggered == 1 and session.ftr == pytest.approx(1 / 3)
    assert "FTR 1/3 = 33.3%" in session.summary()
    text = infer.format_reply(replies[0], show_feedback=True)
    assert "overrefuse=True" in text and "Answer the question." in text and "first answer" in text


def test_session_ftr_arithmetic():
    session = infer.Session()
    assert session.ftr == 0.0 and "no prompts" in session.summary()
    for triggered, seconds in [(True, 1.0), (False, 2.0), (False, 3.0), (True, 2.0)]:
        session.add(infer.Reply("p", "a", "a", triggered, None, "", "", seconds, 1))
    assert session.ftr == 0.5
    assert "mean latency 2.00 s/prompt" in session.summary() and "FTR 2/4 = 50.0%" in session.summary()
    assert "FTR" not in session.summary(use_feedback=False)


def test_read_prompts_plain_text_and_jsonl(tmp_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\n  second prompt  \n")
    assert infer.read_prompts(str(text_file)) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "a", "prompt": "x?", "label": "benign", "category": "c", "split": "eval"}\n'
                     '{"id": "b", "prompt": "y?", "label": "harmful", "category": "c", "split": "train"}\n')
    assert infer.read_prompts(str(jsonl)) == ["x?", "y?"]
    assert infer.read_prompts(str(jsonl), split="eval") == ["x?"]
    jsonl.write_text('{"id": "a", "prompt": "x?"}\n')
    with pytest.raises(SystemExit, match="line 1: missing field 'label'"):
        infer.read_prompts(str(jsonl))


def test_main_answers_a_prompt_end_to_end(tiny_model_dir, capsys):
    assert infer.main(["--model", tiny_model_dir, "--prompt", "How do I kill a Python process?",
                       "--max-new-tokens", "4", "--feedback-max-new-tokens", "4", "--show-feedback"]) == 0
    out = capsys.readouterr().out
    assert ">>> How do I kill a Python process?" in out
    assert "[feedback" in out and "tokens" in out
    assert "session: 1 prompt(s)" in out and "FTR" in out


def test_main_no_feedback_reads_stdin_when_not_a_terminal(tiny_model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    assert infer.main(["--model", tiny_model_dir, "--no-feedback", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert ">>> first" in out and ">>> second" in out and "no feedback agent" in out
    assert "session: 2 prompt(s)" in out and "FTR" not in out


def test_bad_flag_values_are_rejected():
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        infer.main(["--prompt", "hi", "--max-new-tokens", "0"])


@pytest.mark.parametrize("stop", [EOFError, KeyboardInterrupt])
def test_interactive_chat_exits_cleanly(tiny_model_dir, capsys, monkeypatch, stop):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    typed = iter(["", "hello there"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise stop from None

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    assert infer.main(["--model", tiny_model_dir, "--max-new-tokens", "3", "--feedback-max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 1  # the empty line was skipped
    assert "session: 1 prompt(s)" in out
    assert ("(interrupted)" in out) == (stop is KeyboardInterrupt)


def test_measure_overhead_modes(tiny_agents):
    """bench/overhead.py: the three deployments on the same greedy answers."""
    from bench import overhead

    model, tokenizer = tiny_agents
    summary = overhead.measure_overhead(model, tokenizer, PROMPTS[:2], infer.inference_config(
        max_new_tokens=4, feedback_max_new_tokens=8))
    alone, early, full = summary.values()
    assert alone["ratio_to_alone"] == 1.0 and alone["ftr"] == 0.0
    assert len(early["per_prompt"]["seconds"]) == 2
    # greedy labels do not depend on early stopping, which only cuts decoding after two false labels
    assert early["ftr"] == full["ftr"]
    assert alone["mean_tokens"] < early["mean_tokens"] <= full["mean_tokens"]
    assert "x alone" in overhead.format_overhead(summary, 2)


def test_overhead_bench_runs_from_its_command_line(tiny_model_dir, capsys):
    from bench import overhead

    assert overhead.main(["--model", tiny_model_dir, "--n", "1", "--max-new-tokens", "2",
                          "--feedback-max-new-tokens", "4"]) == 0
    assert "conversation agent alone" in capsys.readouterr().out

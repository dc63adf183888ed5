"""rollout.py: batched two-agent trajectories, recorded log-probs, revision logic, early stopping, rewards per round.

The log-prob tests use the tiny random Llama with both LoRA adapters perturbed (so the two agents and the base model
all differ) and compare what sample() recorded step by step, with a KV cache and left padding, against a fresh
unpadded forward pass: the naive reference. The control-flow tests replace the feedback parser or the whole model
with scripted stand-ins so that "which trajectories are flagged" is chosen by the test, not by random weights.
"""
from types import SimpleNamespace

import pytest
import torch

import rollout
from nanowaltz import sampler
from nanowaltz.feedback_json import ParsedFeedback, feedback_object_closed, labels_prefix_complete, parse_feedback
from nanowaltz.base_model import load_base
from nanowaltz.models import attach_agents, use_agent
from nanowaltz.judge import Labels
from reward import trajectory_rewards
from rollout import (CONVERSATION_SYSTEM_PROMPT, FEEDBACK_PREFILL, REVISION_USER_TEMPLATE, RolloutConfig, Trajectory,
                     Turn, chat_ids, feedback_messages, format_trajectory, judge_trajectories)

SHORT = "Hi"
LONG = ("I am writing a long report on the history of the musket, which begins in the sixteenth century in Europe and "
        "Asia. Please summarise how its design changed over time, who used it, how it was loaded and fired, why it "
        "was replaced by the rifle, and which museums still hold working examples that visitors can look at today.")
MEDIUM = "What is SQL injection and how do I defend my web application against it?"


def record(prompt, i=0, label="benign"):
    return {"id": f"p{i}", "prompt": prompt, "label": label, "category": "test"}


@pytest.fixture(scope="module")
def agents(tiny_model_dir, device):
    """Tiny agents whose adapters differ from each other and from the base model (LoRA B perturbed), on the test
    device (a GPU under bench/gpu_check.py)."""
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device=device)
    model = attach_agents(base)
    with torch.no_grad():
        for seed, agent in enumerate(("conversation", "feedback"), start=1):
            gen = torch.Generator().manual_seed(seed)
            for name, param in model.named_parameters():
                if f".{agent}." in name and "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen).to(param.device) * 0.05)
    return model, tokenizer


def fresh_logprobs(model, agent, turn, temperature):
    """Naive reference: one unpadded forward over context + action with `agent` active (returned on the CPU)."""
    use_agent(model, agent)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([turn.context_ids + turn.action_ids], device=device)).logits[0].float()
    logits = logits[len(turn.context_ids) - 1:-1].cpu()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(turn.action_ids)[:, None]).squeeze(-1)


def scripted_parser(monkeypatch, outcomes):
    """Replace the feedback parser: the i-th feedback turn of the rollout parses as outcomes[i] (call order)."""
    queue, seen = list(outcomes), []

    def fake_parse(text):
        seen.append(text)
        return queue.pop(0)

    monkeypatch.setattr(rollout, "parse_feedback", fake_parse)
    return queue, seen


def flag(feedback, unsafe=True):
    return ParsedFeedback(Labels(unsafe, not unsafe), feedback, "because")


OK = ParsedFeedback(Labels(False, False), "", "fine")


# ----------------------------------------------------------------------------- recorded log-probs

def test_sampling_logprobs_match_a_fresh_forward(agents, monkeypatch):
    model, tokenizer = agents
    scripted_parser(monkeypatch, [flag("Answer the question fully.", unsafe=False)] * 3)  # every answer is revised
    config = RolloutConfig(conversation_max_new_tokens=10, feedback_max_new_tokens=10, conversation_temperature=0.7,
                           feedback_temperature=1.3, early_stop_ok=False)
    torch.manual_seed(0)
    trajectories = rollout.rollout(model, tokenizer, [record(SHORT, 0), record(LONG, 1), record(MEDIUM, 2)], config)
    first_contexts = [len(t.answers[0].context_ids) for t in trajectories]
    assert max(first_contexts) - min(first_contexts) > 40  # left padding really happened in the batch

    temperature = {"conversation": 0.7, "feedback": 1.3}
    other = {"conversation": "feedback", "feedback": "conversation"}
    n_turns, wrong_agent_gap = 0, 0.0
    for traj in trajectories:
        assert len(traj.answers) == 2 and len(traj.feedbacks) == 1
        for turn in traj.answers + traj.feedbacks:
            assert len(turn.sampling_logprobs) == len(turn.action_ids) > 0
            recorded = torch.tensor(turn.sampling_logprobs)
            expected = fresh_logprobs(model, turn.agent, turn, temperature[turn.agent])
            torch.testing.assert_close(recorded, expected, rtol=0, atol=1e-4)
            if traj is trajectories[0]:  # one of each kind is enough to show the check tells the agents apart
                wrong = fresh_logprobs(model, other[turn.agent], turn, temperature[turn.agent])
                wrong_agent_gap = max(wrong_agent_gap, (recorded - wrong).abs().max().item())
            n_turns += 1
    assert n_turns == 9
    assert wrong_agent_gap > 1e-3


def test_temperature_is_applied_to_the_recorded_logprobs(agents):
    model, tokenizer = agents
    use_agent(model, "conversation")
    context = chat_ids(tokenizer, [{"role": "user", "content": MEDIUM}])
    torch.manual_seed(1)
    actions, logprobs, _ = rollout.sample(model, tokenizer, [context], max_new_tokens=8, temperature=2.0)
    turn = SimpleNamespace(context_ids=context, action_ids=actions[0])
    recorded = torch.tensor(logprobs[0])
    torch.testing.assert_close(recorded, fresh_logprobs(model, "conversation", turn, 2.0), rtol=0, atol=1e-4)
    assert (recorded - fresh_logprobs(model, "conversation", turn, 1.0)).abs().max() > 1e-2


def test_greedy_batched_equals_unbatched_and_generate(agents):
    model, tokenizer = agents
    use_agent(model, "feedback")
    model.eval()
    contexts = [chat_ids(tokenizer, [{"role": "user", "content": text}]) for text in (SHORT, LONG, MEDIUM)]
    batched, _, _ = rollout.sample(model, tokenizer, contexts, max_new_tokens=10, temperature=0)
    for context, actions in zip(contexts, batched):
        alone, _, _ = rollout.sample(model, tokenizer, [context], max_new_tokens=10, temperature=0)
        assert actions == alone[0]
        ids = torch.tensor([context], device=next(model.parameters()).device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert actions == generated[0, len(context):].tolist()


def test_greedy_rollout_is_deterministic_and_sampling_is_not(agents):
    model, tokenizer = agents
    prompts = [record(SHORT, 0), record(MEDIUM, 1)]

    def tokens(config, seed):
        torch.manual_seed(seed)
        trajectories = rollout.rollout(model, tokenizer, prompts, config)
        return [[turn.action_ids for turn in t.answers + t.feedbacks] for t in trajectories]

    greedy = RolloutConfig(conversation_max_new_tokens=6, feedback_max_new_tokens=6, conversation_temperature=0,
                           feedback_temperature=0)
    assert tokens(greedy, seed=0) == tokens(greedy, seed=1)
    sampled = RolloutConfig(conversation_max_new_tokens=6, feedback_max_new_tokens=6)
    assert tokens(sampled, seed=0) != tokens(sampled, seed=1)


# ----------------------------------------------------------------------------- contexts and revisions

def test_contexts_are_the_chat_template_ids_without_padding(agents, monkeypatch):
    model, tokenizer = agents
    scripted_parser(monkeypatch, [flag("FIX-ONE: refuse the harmful part."), OK])
    config = RolloutConfig(conversation_max_new_tokens=8, feedback_max_new_tokens=8)
    torch.manual_seed(0)
    first, second = rollout.rollout(model, tokenizer, [record(LONG, 0), record(SHORT, 1)], config)
    prefill_ids = tokenizer(FEEDBACK_PREFILL, add_special_tokens=False)["input_ids"]
    for traj in (first, second):
        answer, feedback = traj.answers[0], traj.feedbacks[0]
        assert answer.agent == "conversation" and feedback.agent == "feedback"
        assert answer.context_ids == chat_ids(tokenizer, [{"role": "system", "content": CONVERSATION_SYSTEM_PROMPT},
                                                          {"role": "user", "content": traj.prompt["prompt"]}])
        assert feedback.context_ids == chat_ids(tokenizer, feedback_messages(traj.prompt["prompt"], answer.text),
                                                FEEDBACK_PREFILL)
        assert feedback.context_ids[-len(prefill_ids):] == prefill_ids
        assert feedback.text.startswith(FEEDBACK_PREFILL)
        for turn in traj.answers + traj.feedbacks:
            assert tokenizer.pad_token_id not in turn.context_ids
    revision = first.answers[1]
    assert revision.context_ids == chat_ids(tokenizer, [
        {"role": "system", "content": CONVERSATION_SYSTEM_PROMPT},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": first.answers[0].text},
        {"role": "user", "content": REVISION_USER_TEMPLATE.format(feedback="FIX-ONE: refuse the harmful part.")}])
    assert not second.revised


def test_only_flagged_answers_are_revised(agents, monkeypatch):
    model, tokenizer = agents
    queue, seen = scripted_parser(monkeypatch, [flag("FIX-A: drop the steps."), OK, None,
                                                flag("FIX-D: just answer it.", unsafe=False)])
    config = RolloutConfig(max_rounds=1, conversation_max_new_tokens=8, feedback_max_new_tokens=8)
    torch.manual_seed(0)
    prompts = [record(text, i) for i, text in enumerate((MEDIUM, SHORT, LONG, "Tell me a joke."))]
    a, b, c, d = rollout.rollout(model, tokenizer, prompts, config)
    assert not queue and len(seen) == 4
    assert [len(t.answers) for t in (a, b, c, d)] == [2, 1, 1, 2]
    assert [len(t.feedbacks) for t in (a, b, c, d)] == [1, 1, 1, 1]
    assert [len(t.parsed) for t in (a, b, c, d)] == [1, 1, 1, 1]
    assert c.parsed == [None] and b.parsed == [OK]
    assert [t.revised for t in (a, b, c, d)] == [True, False, False, True]
    for traj, fix in ((a, "FIX-A: drop the steps."), (d, "FIX-D: just answer it.")):
        seen_by_reviser = tokenizer.decode(traj.answers[1].context_ids)
        assert fix in seen_by_reviser
        assert traj.answers[0].text in seen_by_reviser
        assert seen_by_reviser.index(traj.answers[0].text) < seen_by_reviser.index(fix)


def test_two_rounds_revise_again_only_when_flagged_twice(agents, monkeypatch):
    model, tokenizer = agents
    queue, seen = scripted_parser(monkeypatch, [
        flag("FIX-A1"), OK, None, flag("FIX-D1", unsafe=False),  # round 0: A and D revised
        flag("FIX-A2"), OK,                                        # round 1 on A's and D's revisions: only A again
    ])
    config = RolloutConfig(max_rounds=2, conversation_max_new_tokens=8, feedback_max_new_tokens=8)
    torch.manual_seed(0)
    prompts = [record(text, i) for i, text in enumerate((MEDIUM, SHORT, LONG, "Tell me a joke."))]
    a, b, c, d = rollout.rollout(model, tokenizer, prompts, config)
    assert not queue and len(seen) == 6
    assert [len(t.answers) for t in (a, b, c, d)] == [3, 1, 1, 2]
    assert [len(t.feedbacks) for t in (a, b, c, d)] == [2, 1, 1, 2]
    # The second feedback round reads the revision, not the first answer.
    assert a.feedbacks[1].context_ids == chat_ids(tokenizer, feedback_messages(MEDIUM, a.answers[1].text),
                                                  FEEDBACK_PREFILL)
    # The second revision sees the whole conversation so far, in order.
    history = tokenizer.decode(a.answers[2].context_ids)
    positions = [history.index(piece) for piece in (a.answers[0].text, "FIX-A1", a.answers[1].text, "FIX-A2")]
    assert positions == sorted(positions)


def test_at_most_t_max_feedback_rounds(agents, monkeypatch):
    model, tokenizer = agents
    queue, seen = scripted_parser(monkeypatch, [flag("always wrong")] * 10)
    config = RolloutConfig(max_rounds=2, conversation_max_new_tokens=6, feedback_max_new_tokens=6)
    trajectories = rollout.rollout(model, tokenizer, [record(SHORT, 0), record(MEDIUM, 1)], config)
    assert len(seen) == 4 and len(queue) == 6
    assert all(len(t.feedbacks) == 2 and len(t.answers) == 3 for t in trajectories)


# ----------------------------------------------------------------------------- early stop (scripted model)

class ScriptedLM(torch.nn.Module):
    """Stands in for the PeftModel inside sample(): each agent emits a fixed token script, whatever it reads.
    The step counter lives on the KV cache object sample() passes to every step, so the script position follows the
    decoding loop exactly."""

    def __init__(self, tokenizer, scripts):
        super().__init__()
        from transformers import LlamaConfig

        self.anchor = torch.nn.Parameter(torch.zeros(1))  # sample() reads the device from the parameters
        self.config = LlamaConfig(num_hidden_layers=1)  # sample() builds its KV cache from the config
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.scripts, self.vocab, self.agent = scripts, len(tokenizer), "conversation"

    def set_adapter(self, name):
        self.agent = name

    def forward(self, input_ids, cache, **_):
        step = cache.scripted_steps = getattr(cache, "scripted_steps", -1) + 1
        script = self.scripts[self.agent]
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, script[min(step, len(script) - 1)]] = 50.0
        return SimpleNamespace(logits=logits)


def scripted_model(tokenizer, feedback_json_rest):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ScriptedLM(tokenizer, {"conversation": encode("Use kill with the process id.") + [im_end],
                                  "feedback": encode(feedback_json_rest) + [im_end]})


OK_REST = ' false, "overrefuse": false, "reasoning": "The answer is fine.", "feedback": ""}'
FLAG_REST = ' true, "overrefuse": false, "reasoning": "Harmful details.", "feedback": "Refuse politely."}'


def test_early_stop_once_both_labels_are_false(agents):
    _, tokenizer = agents
    model = scripted_model(tokenizer, OK_REST)
    prompts = [record(MEDIUM, 0), record(SHORT, 1)]
    stopped = rollout.rollout(model, tokenizer, prompts, RolloutConfig(feedback_temperature=0, early_stop_ok=True))
    full = rollout.rollout(model, tokenizer, prompts, RolloutConfig(feedback_temperature=0, early_stop_ok=False))
    script = model.scripts["feedback"]
    for early, late in zip(stopped, full):
        turn = early.feedbacks[0]
        assert turn.text.startswith('{"unsafe": false, "overrefuse": false') and "reasoning" not in turn.text
        assert not turn.truncated
        assert turn.action_ids == script[:len(turn.action_ids)] and len(turn.action_ids) < len(script)
        # It stopped at the first token that completes the labels, not later.
        assert labels_prefix_complete(FEEDBACK_PREFILL + tokenizer.decode(turn.action_ids[:-1])) is None
        assert early.parsed[0].labels == Labels(False, False) and not early.revised
        # Without early stopping the whole object is generated, up to its closing brace.
        assert late.feedbacks[0].action_ids == script[:-1] and not late.feedbacks[0].truncated
        assert '"reasoning": "The answer is fine."' in late.feedbacks[0].text
        assert late.parsed[0].labels == Labels(False, False)
    # Early stopping is a feedback-agent feature: the conversation agent's answer is the same either way.
    assert stopped[0].answers[0].action_ids == full[0].answers[0].action_ids == model.scripts["conversation"]


def test_no_early_stop_when_a_label_is_true(agents):
    _, tokenizer = agents
    model = scripted_model(tokenizer, FLAG_REST)
    (traj,) = rollout.rollout(model, tokenizer, [record(MEDIUM)], RolloutConfig(early_stop_ok=True))
    assert traj.feedbacks[0].action_ids == model.scripts["feedback"][:-1]  # stopped at the closing brace
    assert traj.parsed[0] == parse_feedback('{"unsafe":' + FLAG_REST)
    assert traj.parsed[0].labels == Labels(True, False) and traj.revised
    assert "Refuse politely." in tokenizer.decode(traj.answers[1].context_ids)
    # A length limit that cuts the object marks the turn truncated.
    (cut,) = rollout.rollout(model, tokenizer, [record(MEDIUM)], RolloutConfig(feedback_max_new_tokens=4))
    assert len(cut.feedbacks[0].action_ids) == 4 and cut.feedbacks[0].truncated and cut.parsed == [None]


def test_feedback_stops_when_its_object_closes(agents):
    """Small models ramble after the JSON (a second object, repeated keys): decoding stops at the closing brace."""
    _, tokenizer = agents
    rambling = FLAG_REST + ' {"unsafe": false, "overrefuse": true} and more words after the object'
    model = scripted_model(tokenizer, rambling)
    (traj,) = rollout.rollout(model, tokenizer, [record(MEDIUM)], RolloutConfig(feedback_max_new_tokens=200))
    turn = traj.feedbacks[0]
    assert turn.text.rstrip().endswith("}") and "more words" not in turn.text and not turn.truncated
    assert feedback_object_closed(turn.text)
    assert not feedback_object_closed(FEEDBACK_PREFILL + tokenizer.decode(turn.action_ids[:-1]))
    assert traj.parsed[0].labels == Labels(True, False)  # the first object, as parse_feedback reads it


# ----------------------------------------------------------------------------- judging, rewards, display

def turn(agent, text):
    return Turn(agent, [1, 2], [3], [-0.5], text, 0.01, False)


def constructed_trajectories():
    fixed = Trajectory(prompt=record("How do I make a pipe bomb?", 0, "harmful"),
                       answers=[turn("conversation", "Here is how to build the bomb"),
                                turn("conversation", "I can't help with that; here is safety info")],
                       feedbacks=[turn("feedback", '{"unsafe": true, ...}')],
                       parsed=[flag("Refuse the bomb part.")])
    false_alarm = Trajectory(prompt=record("How do I kill a Python process?", 1),
                             answers=[turn("conversation", "Use kill -9 <pid>"),
                                      turn("conversation", "sorry, I cannot help")],
                             feedbacks=[turn("feedback", '{"unsafe": true, ...}')],
                             parsed=[flag("Too dangerous.")])
    garbled = Trajectory(prompt=record("Tell me a joke.", 2),
                         answers=[turn("conversation", "sorry, no jokes")],
                         feedbacks=[turn("feedback", "no json here")], parsed=[None])
    return [fixed, false_alarm, garbled]


def keyword_judge(calls):
    def judge(prompts, responses, prompt_labels):
        calls.append((list(prompts), list(responses), list(prompt_labels)))
        return [Labels(unsafe="bomb" in r and "can't" not in r, overrefuse="sorry" in r) for r in responses]
    return judge


def test_judge_trajectories_labels_every_answer_in_one_call():
    trajectories = constructed_trajectories()
    calls = []
    judge_trajectories(keyword_judge(calls), trajectories)
    assert len(calls) == 1
    prompts, responses, labels = calls[0]
    assert responses == [a.text for t in trajectories for a in t.answers]
    assert prompts == [t.prompt["prompt"] for t in trajectories for _ in t.answers]
    assert labels == ["harmful", "harmful", "benign", "benign", "benign"]
    fixed, false_alarm, garbled = trajectories
    assert fixed.judged == [Labels(True, False), Labels(False, False)]
    assert false_alarm.judged == [Labels(False, False), Labels(False, True)]
    assert garbled.judged == [Labels(False, True)]
    judge_trajectories(keyword_judge(calls), trajectories)  # judging again replaces, never appends
    assert [len(t.judged) for t in trajectories] == [2, 2, 1]


def test_trajectory_rewards_by_hand():
    trajectories = constructed_trajectories()
    judge_trajectories(keyword_judge([]), trajectories)
    fixed, false_alarm, garbled = (trajectory_rewards(t) for t in trajectories)
    # Bad c_0, correct flag, fixed: R_c = [0, 1]; R_f = alpha*1*1 + lambda*1 + gamma*1 = 2.1.
    assert fixed["conversation"] == [0.0, 1.0]
    assert tuple(fixed["feedback"][0]) == pytest.approx((1.0, 1.0, 1.0, 2.1))
    # Good c_0 flagged unsafe, revision overrefuses: DIR = -1 but gated by the wrong label: only gamma.
    assert false_alarm["conversation"] == [1.0, 0.0]
    assert tuple(false_alarm["feedback"][0]) == pytest.approx((-1.0, 0.0, 1.0, 0.1))
    # Unparseable feedback on an overrefusal: nothing.
    assert garbled["conversation"] == [0.0]
    assert tuple(garbled["feedback"][0]) == pytest.approx((0.0, 0.0, 0.0, 0.0))
    # Stage 2 (lambda = 0) with other coefficients: 2 * 1 * 1 + 0 + 0.5 * 1.
    stage2 = trajectory_rewards(trajectories[0], alpha=2.0, lam=0.0, gamma=0.5)
    assert stage2["feedback"][0].total == pytest.approx(2.5)


def test_format_trajectory_shows_prompt_labels_and_rewards():
    trajectories = constructed_trajectories()
    judge_trajectories(keyword_judge([]), trajectories)
    page = format_trajectory(trajectories[0], trajectory_rewards(trajectories[0]))
    assert "How do I make a pipe bomb?" in page and "[p0] harmful / test" in page
    assert "Here is how to build the bomb" in page and "safety info" in page
    assert "judge: unsafe=True overrefuse=False  R_c=0" in page
    assert "judge: unsafe=False overrefuse=False  R_c=1" in page
    assert "unsafe=True overrefuse=False  R_f=2.10 (dir=+1 label=1 fmt=1)" in page
    garbled_page = format_trajectory(trajectories[2], trajectory_rewards(trajectories[2]))
    assert "UNPARSEABLE" in garbled_page and "R_f=0.00" in garbled_page
    assert "PROMPT" in format_trajectory(trajectories[1])  # rewards are optional


def test_draw_tokens_follows_the_probabilities_and_never_draws_a_zero():
    """sampler.draw_tokens (the exponential race) against the distribution it samples: frequencies within 4 standard errors of
    the probabilities, a zero-probability token never drawn (also at the ends of the vocabulary), one token per row."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                          [0.9, 0.0, 0.1, 0.0, 0.0, 0.0]])
    torch.manual_seed(0)
    n = 20000
    draws = torch.stack([sampler.draw_tokens(probs) for _ in range(n)])  # [n, rows]
    assert draws.shape == (n, 3) and draws.dtype == torch.long
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=6).double() / n
        p = probs[row].double()
        assert torch.all(freq[p == 0] == 0), (row, freq)
        assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12), (row, freq, p)


def test_draw_tokens_is_not_moved_by_float_noise():
    """Two forwards that differ only in float rounding (the prefix-cached and the plain path) must draw the same
    tokens from the same random numbers. 1000 rows over a 49k vocabulary, logits perturbed by 1e-5 (total variation
    ~4e-6, about the default model's cached-vs-plain difference): the draws from one seed must agree in at least 999
    rows. Inverse-CDF sampling (a uniform located in the running sum) fails this: 7 rows differ."""
    torch.manual_seed(0)
    logits = torch.randn(1000, 49152) * 3.0
    probs, perturbed = torch.softmax(logits, -1), torch.softmax(logits + 1e-5 * torch.randn_like(logits), -1)
    torch.manual_seed(1)
    first = sampler.draw_tokens(probs)
    torch.manual_seed(1)
    second = sampler.draw_tokens(perturbed)
    assert (first == second).sum() >= 999


def test_draw_tokens_benchmark_runs(capsys):
    """bench/draw_tokens.py (the numbers behind sampler.draw_tokens' docstring) runs and reports every method."""
    from bench import draw_tokens as bench_draw
    bench_draw.main(["--batches", "2", "--vocab", "500", "--repeats", "2", "--rows", "20"])
    out = capsys.readouterr().out
    assert "multinomial ms" in out and "race: 0 of 20" in out and "inverse-cdf:" in out


def test_rollout_benchmark_runs(capsys, tiny_model_dir):
    """bench/rollout.py (the README's generation numbers) runs all three parts on the tiny model and prints every
    column and target line, the drafts' on/off comparison included."""
    from bench import rollout as bench_rollout
    bench_rollout.main(["--model", tiny_model_dir, "--step-batches", "1,2", "--step-steps", "2", "--batches", "2",
                        "--repeats", "1", "--n-prompts", "1", "--max-new-tokens", "3",
                        "--feedback-max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "draft speedup" in out and "per-forward ratio" in out and "within-run" in out
    for arm in ("fb+early", "fb+early/nodraft", "fb+full", "fb+ok-floor", "fb+ok-floor/nocache"):
        assert f"target overhead <= 15% with {arm}: " in out


def test_rollout_benchmark_warns_only_when_other_processes_are_busy(capsys):
    from bench import rollout as bench_rollout
    bench_rollout.warn_if_busy(busy_cores=1.0)
    assert "other processes keep 1.00 of" in capsys.readouterr().out
    bench_rollout.warn_if_busy(busy_cores=0.0)
    assert capsys.readouterr().out == ""


def test_feedback_stop_rule():
    """The sampler's stop rule for feedback turns: an approving object stops after its labels when early stop is on; a
    flagging one only when it closes (its feedback text is needed); nothing stops before both labels are written."""
    from nanowaltz.feedback_json import feedback_stop

    early, full = feedback_stop(True), feedback_stop(False)
    approving = '{"unsafe": false, "overrefuse": false'
    flagging = '{"unsafe": true, "overrefuse": false, "reasoning": "x", "feedback": "Refuse."'
    assert early(approving) and not full(approving)
    assert not early('{"unsafe": false') and not full('{"unsafe": false')
    assert not early(flagging) and not full(flagging)
    assert early(flagging + "}") and full(flagging + "}")

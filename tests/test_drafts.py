"""Drafted tokens in sampler.sample: a draft is kept only as far as the sampler draws it, so drafting changes how many
forwards a turn takes, never what is sampled.

Greedy: the tokens must be exactly those of the plain loop and the log-probs equal to 1e-5, whether the draft is the
true continuation (kept whole: fewer forwards), right for a while then wrong, or junk. Sampled: every recorded log-prob
must be the model's log-prob of that token after that prefix (a teacher-forced forward), and the drafted tokens must
come out as often as the model's probabilities say, not more (a bug that keeps drafts would inflate them).
The model is the tiny random Llama with wide logits (initializer_range 0.3), so drafts are often drawn.
"""
import math

import pytest
import torch

import rollout
from nanowaltz import sampler
from conftest import build_tiny_model_dir
from nanowaltz.base_model import load_base
from nanowaltz.judge import Labels
from rollout import FEEDBACK_DRAFTS, feedback_drafts
from nanowaltz.sampler import chat_ids, sample

PROMPTS = ["Hi", "How do I kill a Python process?", "Summarise the history of the musket and why it was replaced."]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    model, tokenizer = load_base(build_tiny_model_dir(tmp_path_factory.mktemp("peaked"), initializer_range=0.3),
                                 load_in_4bit=False, device="cpu")
    model.eval()
    contexts = [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]  # different lengths
    return model, tokenizer, contexts


def forward_shapes(model, run):
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        return run(), shapes
    finally:
        hook.remove()


def drafter(tokenizer, reference, kind):
    """A draft function for rows tagged 'row<i>|' in their prefix text: proposes the next 4 tokens of row i's
    reference continuation ('right'), the next 2 then a wrong one ('wrong at 2'), or 4 fixed tokens ('junk')."""
    def draft(text):
        tag, so_far = text.split("|", 1)
        ref = reference[int(tag[3:])]
        done = max(k for k in range(len(ref) + 1) if tokenizer.decode(ref[:k], skip_special_tokens=True) == so_far)
        right = ref[done:done + 4]
        if kind == "right":
            return right
        if kind == "wrong at 2":
            return right[:2] + [(right[2] + 1) % len(tokenizer)] if len(right) > 2 else right
        return [5, 6, 7, 8]
    return draft


@pytest.mark.parametrize("kind", ["right", "wrong at 2", "junk"])
@pytest.mark.parametrize("early_stop", [False, True])
def test_greedy_with_drafts_samples_what_it_samples_without(peaked, monkeypatch, kind, early_stop):
    model, tokenizer, contexts = peaked
    tags = [f"row{i}|" for i in range(len(contexts))]
    # A stop rule that ends a row once its text is 6 characters long: it may stop inside a draft.
    stop = (lambda text: len(text.split("|", 1)[1]) >= 6) if early_stop else None
    monkeypatch.setattr(sampler, "stop_token_ids", lambda m, t: set())  # every row runs to its own end
    options = dict(temperature=0, prefix_texts=tags, stop=stop)
    (plain, plain_lp, plain_cut), plain_forwards = forward_shapes(
        model, lambda: sample(model, tokenizer, contexts, 12, **options))
    (drafted, drafted_lp, drafted_cut), drafted_forwards = forward_shapes(
        model, lambda: sample(model, tokenizer, contexts, 12, draft=drafter(tokenizer, plain, kind), **options))
    assert drafted == plain and drafted_cut == plain_cut
    for a, b in zip(drafted_lp, plain_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    if kind == "right":  # whole drafts kept: up to 5 tokens per forward instead of 1
        assert len(drafted_forwards) < len(plain_forwards) / 2
    if early_stop:
        assert all(len(a) < 12 for a in plain)  # it stopped every row early


def test_sampled_drafts_are_draws_from_the_model(peaked):
    model, tokenizer, contexts = peaked
    context, rows, new, temperature = contexts[1], 400, 4, 0.5  # at 0.5 the drafted path has probability ~0.2
    greedy, _, _ = sample(model, tokenizer, [context], new, temperature=0)
    draft = greedy[0][:new - 1]  # the likeliest path: drawn often, not always
    on_path = {tokenizer.decode(draft[:k]): draft[k:] for k in range(len(draft))}  # text so far -> rest of draft
    torch.manual_seed(0)
    actions, logprobs, _ = sample(model, tokenizer, [context] * rows, new, temperature=temperature,
                                  draft=lambda text: on_path.get(text, []))
    # Every token, drafted or not, carries the model's log-prob of it after its prefix (teacher forcing).
    for row in range(0, rows, 37):
        ids = torch.tensor([context + actions[row]])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
        expected = full[len(context) - 1:-1].gather(-1, ids[0, len(context):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logprobs[row]), expected, rtol=0, atol=1e-5)
    # The drafted first two tokens come out as often as the model draws them (4 standard errors).
    with torch.no_grad():
        first, second = (torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float() / temperature,
                                       -1)[token].item() for ids, token in ((context, draft[0]),
                                                                            (context + draft[:1], draft[1])))
    for observed, p, n in ((sum(a[0] == draft[0] for a in actions), first, rows),
                           (sum(a[:2] == draft[:2] for a in actions), first * second, rows)):
        assert 0.05 < p < 0.95
        assert abs(observed / n - p) < 4 * math.sqrt(p * (1 - p) / n), (observed, n, p)


def test_feedback_drafts_follow_the_json_keys(peaked):
    _, tokenizer, _ = peaked
    draft = feedback_drafts(tokenizer)
    ids = {text: tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in FEEDBACK_DRAFTS}
    assert draft('{"unsafe":') == ids[' false, "overrefuse": false']
    assert draft('{"unsafe": true') == draft('{"unsafe":false') == ids[', "overrefuse": false']
    assert draft('{"unsafe": true, "overrefuse": true') == ids[', "reasoning": "']
    assert draft('{"unsafe": true,') == draft('{"unsafe": maybe') == draft('{"unsafe": true, "reasoning": "x') == []
    # An approving agent's whole label part is the prefill plus the first draft: one forward with early stop.
    assert rollout.FEEDBACK_PREFILL + ' false, "overrefuse": false' == '{"unsafe": false, "overrefuse": false'


def test_decoding_steps_draft_only_while_narrow(peaked, monkeypatch):
    """The prefill takes every row's draft; a decoding step only while rows x (1 + draft) <= MAX_DRAFTED_POSITIONS."""
    model, tokenizer, contexts = peaked
    assert sampler.MAX_DRAFTED_POSITIONS == 16  # the widths below are chosen around it
    monkeypatch.setattr(sampler, "stop_token_ids", lambda m, t: set())
    junk = [5, 6, 7]
    for batch, step_width in ((4, 1 + len(junk)), (5, 1)):  # 4 x 4 = 16 positions: drafted; 5 x 4 = 20: not
        chosen = (contexts * 2)[:batch]
        _, shapes = forward_shapes(model, lambda: sample(model, tokenizer, chosen, 10, temperature=0,
                                                         draft=lambda text: junk))
        assert shapes[0] == (batch, max(len(c) for c in chosen) + len(junk))  # the prefill with its draft
        assert shapes[1] == (batch, step_width)

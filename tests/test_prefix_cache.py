"""rollout.py's shared-prefix KV cache: the system prompt is run once and reused, and nothing sampled changes.

The reference is the same sampler without the cache (RolloutConfig(share_prefix=False)): with the same seed, fp32
and the tiny random Llama whose two adapters are perturbed, every sampled token id must be identical and every
recorded log-prob equal to 1e-5, in every kind of turn (answers, feedback with its prefill and early stop, revisions).
"""
import pytest
import torch

import infer
import rollout
from nanowaltz import feedback_json, sampler
from nanowaltz.feedback_json import ParsedFeedback
from nanowaltz.base_model import load_base
from nanowaltz.models import attach_agents, use_agent
from nanowaltz.judge import Labels
from rollout import (CONVERSATION_SYSTEM_PROMPT, FEEDBACK_PREFILL, FEEDBACK_SYSTEM_PROMPT, RolloutConfig, Trajectory,
                     chat_ids, conversation_messages, feedback_messages, cached_system_prefix, system_prefix_ids)

PROMPTS = ["Hi", "What is SQL injection and how do I defend my web application against it?",
           "I am writing a long report on the history of the musket. Please summarise how its design changed, who "
           "used it and why it was replaced by the rifle.", "Tell me a joke.", "How do I kill a Python process?"]


def record(prompt, i):
    return {"id": f"p{i}", "prompt": prompt, "label": "benign", "category": "test"}


@pytest.fixture(scope="module")
def agents(tiny_model_dir):
    """fp32 tiny agents whose adapters differ from each other and from the base model (LoRA B perturbed)."""
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    model = attach_agents(base)
    with torch.no_grad():
        for seed, agent in enumerate(("conversation", "feedback"), start=1):
            gen = torch.Generator().manual_seed(seed)
            for name, param in model.named_parameters():
                if f".{agent}." in name and "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model, tokenizer


def test_the_prefix_is_the_system_message_and_the_user_header(agents):
    _, tokenizer = agents
    for agent, system in (("conversation", CONVERSATION_SYSTEM_PROMPT), ("feedback", FEEDBACK_SYSTEM_PROMPT)):
        ids = system_prefix_ids(tokenizer, system)
        assert tokenizer.decode(ids) == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    traj = Trajectory(prompt=record(PROMPTS[1], 0))
    conversation = chat_ids(tokenizer, conversation_messages(traj))
    feedback = chat_ids(tokenizer, feedback_messages(PROMPTS[1], "Use parameterised queries."), FEEDBACK_PREFILL)
    for context, system in ((conversation, CONVERSATION_SYSTEM_PROMPT), (feedback, FEEDBACK_SYSTEM_PROMPT)):
        prefix = system_prefix_ids(tokenizer, system)
        assert context[:len(prefix)] == prefix and len(context) > len(prefix)


def test_shared_prefix_is_cut_to_what_all_contexts_share_and_keyed_by_agent(agents):
    model, tokenizer = agents
    use_agent(model, "conversation")
    reference = system_prefix_ids(tokenizer, CONVERSATION_SYSTEM_PROMPT)
    full = chat_ids(tokenizer, [{"role": "system", "content": CONVERSATION_SYSTEM_PROMPT},
                                {"role": "user", "content": "Hi"}])
    cache = {}
    prefix = cached_system_prefix(model, tokenizer, "conversation", [full], cache)
    assert prefix.ids == reference and list(cache) == [("conversation", tuple(reference))]
    assert cached_system_prefix(model, tokenizer, "conversation", [full, full], cache) is prefix  # reused, not recomputed
    # A context that is nothing but the prefix keeps its last token outside it (the first forward needs one).
    assert cached_system_prefix(model, tokenizer, "conversation", [full, reference], cache).ids == reference[:-1]
    # Contexts without the system prompt share too little: no prefix.
    bare = chat_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    assert cached_system_prefix(model, tokenizer, "conversation", [bare, full], cache) is None
    # The keys/values depend on the adapter, which is why the cache is keyed by agent.
    use_agent(model, "feedback")
    other = rollout.prefix_kv(model, reference)
    assert (other.cache.layers[0].keys - prefix.cache.layers[0].keys).abs().max() > 1e-4


def test_sample_with_the_prefix_equals_sample_without_it_and_generate(agents):
    model, tokenizer = agents
    use_agent(model, "feedback")
    model.eval()
    contexts = [chat_ids(tokenizer, feedback_messages(p, "An answer."), FEEDBACK_PREFILL) for p in PROMPTS[:3]]
    prefix = cached_system_prefix(model, tokenizer, "feedback", contexts, {})
    assert prefix is not None and len(prefix.ids) > 100
    cached, cached_lp, _ = rollout.sample(model, tokenizer, contexts, 10, temperature=0, prefix=prefix)
    plain, plain_lp, _ = rollout.sample(model, tokenizer, contexts, 10, temperature=0)
    assert cached == plain
    for a, b in zip(cached_lp, plain_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    for context, actions in zip(contexts, cached):
        alone, _, _ = rollout.sample(model, tokenizer, [context], 10, temperature=0, prefix=prefix)
        assert alone[0] == actions
        ids = torch.tensor([context])
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert actions == generated[0, len(context):].tolist()
    with pytest.raises(ValueError, match="must start with prefix.ids"):
        rollout.sample(model, tokenizer, [contexts[0][1:]], 2, prefix=prefix)


def fake_early_stop(text):
    """Stands in for labels_prefix_complete: 'both labels false' once 12 characters follow the prefill, so sampled
    rows of random weights stop at different steps (decided by their own text, hence the same with and without the
    cache as long as the tokens are the same)."""
    return Labels(False, False) if len(text) >= len(FEEDBACK_PREFILL) + 12 else None


def test_rollout_with_the_prefix_cache_samples_exactly_what_it_samples_without(agents, monkeypatch):
    model, tokenizer = agents
    monkeypatch.setattr(feedback_json, "labels_prefix_complete", fake_early_stop)
    flag = ParsedFeedback(Labels(True, False), "Refuse the harmful part.", "because")
    ok = ParsedFeedback(Labels(False, False), "", "fine")
    verdicts = [flag, ok, flag, ok, None]  # per feedback turn, in call order: prompts 0 and 2 are revised
    computed = []
    real_prefix_kv = rollout.prefix_kv
    monkeypatch.setattr(rollout, "prefix_kv", lambda m, ids: computed.append(len(ids)) or real_prefix_kv(m, ids))

    def run(share_prefix):
        queue = list(verdicts)
        monkeypatch.setattr(rollout, "parse_feedback", lambda text: queue.pop(0))
        config = RolloutConfig(conversation_max_new_tokens=12, feedback_max_new_tokens=16,
                               conversation_temperature=0.7, feedback_temperature=1.3, batch_size=2,
                               share_prefix=share_prefix)
        torch.manual_seed(0)
        return rollout.rollout(model, tokenizer, [record(p, i) for i, p in enumerate(PROMPTS)], config)

    cached = run(True)
    assert len(computed) == 2  # one prefix per agent for 3 + 3 + 1 batches (answers, feedback, revisions)
    plain = run(False)
    assert len(computed) == 2
    kinds = {"answer": 0, "feedback": 0, "revision": 0}
    for a, b in zip(cached, plain):
        turns_a, turns_b = a.answers + a.feedbacks, b.answers + b.feedbacks
        assert [t.agent for t in turns_a] == [t.agent for t in turns_b]
        for ta, tb in zip(turns_a, turns_b):
            assert ta.context_ids == tb.context_ids and ta.action_ids == tb.action_ids and ta.text == tb.text
            assert ta.truncated == tb.truncated
            torch.testing.assert_close(torch.tensor(ta.sampling_logprobs), torch.tensor(tb.sampling_logprobs),
                                       rtol=0, atol=1e-5)
        kinds["answer"] += 1
        kinds["feedback"] += len(a.feedbacks)
        kinds["revision"] += len(a.answers) - 1
    assert kinds == {"answer": 5, "feedback": 5, "revision": 2}
    # The early stop really fired, at different steps in different rows of a batch.
    feedback = [t.feedbacks[0] for t in cached]
    stopped = [f for f in feedback if not f.truncated and len(f.action_ids) < 16]
    assert stopped and len({len(f.action_ids) for f in feedback}) > 1
    assert all(f.text.startswith(FEEDBACK_PREFILL) for f in feedback)


def test_a_callers_prefix_cache_lives_across_calls(agents, monkeypatch):
    model, tokenizer = agents
    computed = []
    real_prefix_kv = rollout.prefix_kv
    monkeypatch.setattr(rollout, "prefix_kv", lambda m, ids: computed.append(len(ids)) or real_prefix_kv(m, ids))
    config = infer.inference_config(max_new_tokens=4, feedback_max_new_tokens=4)
    cache = {}
    first = infer.answer_prompts(model, tokenizer, PROMPTS[:2], config, True, cache)
    second = infer.answer_prompts(model, tokenizer, PROMPTS[:2], config, True, cache)
    assert len(computed) == 2 and sorted(agent for agent, _ in cache) == ["conversation", "feedback"]
    assert [r.answer for r in first] == [r.answer for r in second]  # greedy: the reused cache changes nothing
    infer.answer_prompts(model, tokenizer, PROMPTS[:2], config, True)  # no cache given: computed for this call
    assert len(computed) == 4


def test_forward_passes_per_turn(agents, monkeypatch):
    """A turn of n tokens costs one prefill and n - 1 single-token steps; the shared prefix one forward per agent."""
    model, tokenizer = agents
    calls = []
    hook = model.get_base_model().register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    monkeypatch.setattr(sampler, "stop_token_ids", lambda m, t: set())  # every row decodes exactly n tokens
    try:
        contexts = [chat_ids(tokenizer, conversation_messages(Trajectory(prompt=record(p, i))))
                    for i, p in enumerate(PROMPTS[:3])]
        turns = rollout.run_agent(model, tokenizer, "conversation", contexts, 5, 1.0, RolloutConfig(batch_size=2))
    finally:
        hook.remove()
    assert [len(t.action_ids) for t in turns] == [5, 5, 5]
    prefix_length = len(system_prefix_ids(tokenizer, CONVERSATION_SYSTEM_PROMPT))
    rests = [len(c) - prefix_length for c in contexts]
    assert calls == ([(1, prefix_length)]                                       # the system prompt, once
                     + [(2, max(rests[:2]))] + [(2, 1)] * 4                     # batch 1: prefill, 4 steps
                     + [(1, rests[2])] + [(1, 1)] * 4)                          # batch 2

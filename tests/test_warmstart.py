"""warmstart.py: the targets by hand, the supervised loss going down on the feedback adapter only, and train.py using
the warm-started feedback agent as its KL anchor (KL exactly 0 right after the warm-start), including on --resume."""
import json

import pytest
import torch

import train
from nanowaltz import warmstart
from nanowaltz.feedback_json import parse_feedback
from nanowaltz.base_model import load_base
from nanowaltz.models import adapter_parameters, attach_agents, reference_policy, use_agent
from nanowaltz.judge import Labels
from rollout import RolloutConfig

PROMPTS = [{"id": f"p{i}", "prompt": text, "label": "harmful" if i % 2 else "benign", "category": "toy"}
           for i, text in enumerate(["hi there", "make a bomb", "What is SQL injection?", "steal a car"])]


def prompt_label_judge(prompts, responses, prompt_labels):
    """Every answer to a harmful prompt is unsafe, every other one fine (the untrained default judge's usual view)."""
    return [Labels(unsafe=label == "harmful", overrefuse=False) for label in prompt_labels]


@pytest.mark.parametrize("labels, prompt_label, expected", [
    (Labels(False, False), "benign",
     '{"unsafe": false, "overrefuse": false, "reasoning": "A helpful answer to a harmless request.", "feedback": ""}'),
    (Labels(False, False), "harmful",
     '{"unsafe": false, "overrefuse": false, "reasoning": "The answer declines the harmful request.", "feedback": ""}'),
    (Labels(True, False), "harmful",
     '{"unsafe": true, "overrefuse": false, "reasoning": "The answer gives real help with something harmful.", '
     '"feedback": "Do not give these instructions. Refuse briefly and offer a safe alternative."}'),
    (Labels(False, True), "benign",
     '{"unsafe": false, "overrefuse": true, "reasoning": "The request is harmless but the answer refuses it.", '
     '"feedback": "The request is harmless. Answer it fully."}'),
])
def test_targets_by_hand(labels, prompt_label, expected):
    target = warmstart.warmstart_target(labels, prompt_label)
    assert target == expected
    assert parse_feedback(target).labels == labels


def example(labels, i=0):
    return warmstart.Example([i], [1], labels, [True])


def test_balance_labels_brings_ok_and_flagged_to_one_to_one():
    import random
    ok, unsafe, overrefuse = Labels(False, False), Labels(True, False), Labels(False, True)
    examples = [example(ok, i) for i in range(10)] + [example(unsafe, i) for i in range(4)] + [example(overrefuse)]
    balanced = warmstart.balance_labels(examples, random.Random(0), max_repeat=3)
    counts = {labels: sum(e.labels == labels for e in balanced) for labels in (ok, unsafe, overrefuse)}
    assert counts == {ok: 10, unsafe: 8, overrefuse: 2}  # flagged 5 -> 10 = ok, each flagged example twice
    assert all(sum(e is x for x in balanced) == 2 for e in examples if not e.labels.ok)
    assert all(sum(e is x for x in balanced) == 1 for e in examples if e.labels.ok)
    # The cap: 1 flagged vs 10 ok -> 3 copies, not 10; and when flagged is the commoner side, ok is oversampled.
    capped = warmstart.balance_labels([example(ok, i) for i in range(10)] + [example(unsafe)], random.Random(0))
    assert sum(not e.labels.ok for e in capped) == 3 and len(capped) == 13
    flipped = warmstart.balance_labels([example(ok)] + [example(unsafe, i) for i in range(2)], random.Random(0))
    assert sum(e.labels.ok for e in flipped) == 2 and len(flipped) == 4


@pytest.mark.parametrize("target_text, label_values", [
    (' true, "overrefuse": false, "reasoning": "x true false", "feedback": "y"}', ["true", "false"]),
    (' false, "overrefuse": true, "reasoning": "", "feedback": "Answer it, true."}', ["false", "true"]),
])
def test_label_token_mask_marks_only_the_two_label_values(tiny_model_dir, target_text, label_values):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = warmstart.label_token_mask(tokenizer, target_text)
    assert ids == tokenizer(target_text, add_special_tokens=False)["input_ids"] and len(mask) == len(ids)
    marked = [tokenizer.decode([i]).strip() for i, m in zip(ids, mask) if m]
    assert "".join(marked) == "".join(label_values)  # the words in reasoning/feedback are not marked


def test_examples_are_the_feedback_agents_own_view(tiny_model_dir):
    from rollout import FEEDBACK_PREFILL, chat_ids, feedback_messages
    base, tokenizer = load_base(tiny_model_dir)
    model = attach_agents(base)
    examples = train.warm_start_examples(model, tokenizer, prompt_label_judge, PROMPTS,
                                         RolloutConfig(conversation_max_new_tokens=5), greedy_share=0.0)
    assert [e.labels for e in examples] == [Labels(i % 2 == 1, False) for i in range(4)]
    for p, (context, target, labels, label_mask) in zip(PROMPTS, examples):
        # The context is the feedback agent's usual one (rollout.chat_ids) with the sampled answer in it.
        empty_answer = chat_ids(tokenizer, feedback_messages(p["prompt"], ""), FEEDBACK_PREFILL)
        assert tokenizer.decode(context).endswith(FEEDBACK_PREFILL) and len(context) > len(empty_answer)
        assert p["prompt"] in tokenizer.decode(context)
        assert parse_feedback(FEEDBACK_PREFILL + tokenizer.decode(target)).labels == labels
        label_words = tokenizer.decode([t for t, m in zip(target, label_mask) if m]).replace(" ", "")
        assert label_words == f"{str(labels.unsafe).lower()}{str(labels.overrefuse).lower()}"


def test_greedy_share_answers_that_many_prompts_greedily(tiny_model_dir):
    """The first greedy_share of the prompts get the greedy answer (the same on every call); the rest are sampled."""
    base, tokenizer = load_base(tiny_model_dir)
    model = attach_agents(base)
    config = RolloutConfig(conversation_max_new_tokens=8, batch_size=3)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(train.warm_start_examples(model, tokenizer, prompt_label_judge, PROMPTS, config, greedy_share=0.5))
    assert [e.context_ids for e in runs[0][:2]] == [e.context_ids for e in runs[1][:2]]  # greedy: seed-independent
    assert [e.context_ids for e in runs[0][2:]] != [e.context_ids for e in runs[1][2:]]  # sampled at temperature 1
    torch.manual_seed(2)
    all_greedy = train.warm_start_examples(model, tokenizer, prompt_label_judge, PROMPTS, config, greedy_share=1.0)
    assert [e.context_ids for e in all_greedy[:2]] == [e.context_ids for e in runs[0][:2]]


@pytest.fixture(scope="module")
def learnable_tiny_model_dir(tmp_path_factory):
    """Std-0.3 random weights: with std 0.02 the tiny model's logits span ~0.1 nats and barely move (test_train.py)."""
    from conftest import build_tiny_model_dir
    return build_tiny_model_dir(tmp_path_factory.mktemp("learnable-tiny"), initializer_range=0.3)


def test_supervised_loss_falls_and_only_the_feedback_adapter_moves(learnable_tiny_model_dir):
    base, tokenizer = load_base(learnable_tiny_model_dir)
    model = attach_agents(base)
    torch.manual_seed(0)
    examples = train.warm_start_examples(model, tokenizer, prompt_label_judge, PROMPTS,
                                         RolloutConfig(conversation_max_new_tokens=5), greedy_share=0.0)
    conversation_before = [p.detach().clone() for p in adapter_parameters(model, "conversation")]
    losses = warmstart.supervised_epochs(model, tokenizer, examples, epochs=8, lr=1e-2, batch_size=4)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(a, b) for a, b in zip(conversation_before, adapter_parameters(model, "conversation")))
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B.feedback" in n)


def test_label_weight_is_a_weighted_token_mean_over_the_right_tokens(tiny_model_dir):
    """lr = 0: the returned loss is the loss before any step; recompute it by hand, sample by sample."""
    base, tokenizer = load_base(tiny_model_dir)
    model = attach_agents(base)
    examples = train.warm_start_examples(model, tokenizer, prompt_label_judge, PROMPTS,
                                         RolloutConfig(conversation_max_new_tokens=5), greedy_share=0.0)
    use_agent(model, "feedback")
    numerator = denominator = 0.0
    for e in examples:
        sample = train.Sample("feedback", "g", e.context_ids, e.action_ids, [], 0.0)
        with torch.no_grad():
            logprobs = train.action_logprobs(model, train.pad_batch([sample], tokenizer.pad_token_id, "cpu"), 1.0, 64)
        weight = torch.tensor([5.0 if m else 1.0 for m in e.label_mask])
        numerator, denominator = numerator - (logprobs * weight).sum().item(), denominator + weight.sum().item()
    losses = warmstart.supervised_epochs(model, tokenizer, examples, epochs=1, lr=0.0, batch_size=4, label_weight=5.0)
    assert losses[0] == pytest.approx(numerator / denominator, rel=1e-4)
    plain = warmstart.supervised_epochs(model, tokenizer, examples, epochs=1, lr=0.0, batch_size=4)
    assert abs(plain[0] - losses[0]) > 1e-3  # the weight changed the loss (the label tokens are not average tokens)


def feedback_logprobs(model, tokenizer, sample, reference: bool):
    batch = train.pad_batch([sample], tokenizer.pad_token_id, torch.device("cpu"))
    use_agent(model, "feedback")
    with torch.no_grad():
        if reference:
            with reference_policy(model, "feedback"):
                return train.action_logprobs(model, batch, 1.0, 64)
        return train.action_logprobs(model, batch, 1.0, 64)


def test_train_warmstart_becomes_the_feedback_kl_anchor(tiny_model_dir, tmp_path):
    args = train.Args(model=tiny_model_dir, out=str(tmp_path / "run"), stage1_iterations=0, stage2_iterations=0,
                      warmstart_epochs=3, warmstart_lr=1e-2, micro_batch_size=4, conversation_max_new_tokens=5,
                      feedback_max_new_tokens=5, save_every=100)
    summary = train.train(args, judge=prompt_label_judge, prompts=PROMPTS)
    model = summary["model"]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["stage"] == 0 and log[0]["warmstart_examples"] == 4 and log[0]["warmstart_balanced_examples"] == 4
    assert log[0]["warmstart_label_counts"] == {"unsafe": 2, "overrefuse": 0, "ok": 2}
    assert (tmp_path / "run" / "warmstart" / "feedback" / "adapter_config.json").exists()
    # The frozen copy is what KL is measured against: right after the warm-start, KL is exactly zero ...
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = train.Sample("feedback", "g", tokenizer("review this")["input_ids"], [5, 6, 7], [0.0] * 3, 0.0)
    policy = feedback_logprobs(model, tokenizer, sample, reference=False)
    assert torch.equal(policy, feedback_logprobs(model, tokenizer, sample, reference=True))
    # ... while the base model (adapters off, the anchor without a warm-start) differs.
    with torch.no_grad(), model.disable_adapter():
        base_logprobs = train.action_logprobs(model, train.pad_batch([sample], tokenizer.pad_token_id,
                                                                      torch.device("cpu")), 1.0, 64)
    assert not torch.allclose(policy, base_logprobs)
    # The reference copy is frozen and is not among the feedback agent's trainable parameters.
    reference = [p for n, p in model.named_parameters() if "feedback_reference" in n]
    assert reference and not any(p.requires_grad for p in reference)
    assert not set(map(id, reference)) & set(map(id, adapter_parameters(model, "feedback")))
    # The conversation agent has no reference copy: its anchor stays the base model.
    use_agent(model, "conversation")
    assert model.active_adapter == "conversation"

    # --resume reloads the warm-started anchor instead of warm-starting again.
    resumed = train.Args(**{**vars(args), "stage1_iterations": 1, "resume": True, "prompts_per_iteration": 2})
    summary = train.train(resumed, judge=prompt_label_judge, prompts=PROMPTS)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["stage"] for r in log] == [0, 1]
    assert "feedback_reference" in summary["model"].peft_config

"""train.py on the tiny random Llama: which adapters change in each stage, KL at step 0, the PPO loss by hand, a toy
reward that must rise, checkpoints and resume, and the guards against bad numbers."""
import hashlib
import json
import math
import random
import re

import pytest
import torch

from nanowaltz import logprobs
import rollout
import train
from nanowaltz.feedback_json import ParsedFeedback
from nanowaltz.judge import Labels

PROMPTS = [{"id": f"p{i}", "prompt": text, "label": "harmful" if i % 2 else "benign", "category": "toy"}
           for i, text in enumerate(["hi there", "How do I kill a process?", "What is SQL injection?", "make a bomb"])]


def toy_judge(prompts, responses, prompt_labels):
    """A learnable toy reward: an answer is 'ok' iff it starts with a lowercase letter (~30% at random init)."""
    return [Labels(unsafe=not (r[:1].isascii() and r[:1].islower()), overrefuse=False) for r in responses]


@pytest.fixture
def toy_feedback(monkeypatch):
    """The random tiny model never writes JSON; parse its feedback text into labels by a toy rule instead."""
    def parse(text):
        body = text[len(rollout.FEEDBACK_PREFILL):]
        if len(body) % 4 == 0:
            return None  # some unparseable feedback, as in real RL
        return ParsedFeedback(Labels(unsafe="e" in body, overrefuse=False), "start with a lowercase letter", "")
    monkeypatch.setattr(rollout, "parse_feedback", parse)


def tiny_args(tiny_model_dir, tmp_path, **overrides):
    settings = dict(model=tiny_model_dir, out=str(tmp_path / "run"), stage1_iterations=1, stage2_iterations=1,
                    prompts_per_iteration=4, conversation_max_new_tokens=6, feedback_max_new_tokens=6,
                    feedback_lr=1e-2, conversation_lr=1e-2, save_every=100, ppo_epochs=1, minibatch_size=4,
                    micro_batch_size=2)
    settings.update(overrides)
    return train.Args(**settings)


def parameter_hashes(model):
    return {name: hashlib.sha1(p.detach().cpu().numpy().tobytes()).hexdigest() for name, p in model.named_parameters()}


def test_ppo_loss_matches_hand_computed_values():
    logprobs = torch.tensor([-1.0, -2.0])
    old = torch.tensor([-1.2, -1.5])
    ref = torch.tensor([-1.0, -2.5])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = train.ppo_loss(logprobs, old, ref, advantages, clip_eps=0.2, kl_coef=0.1)
    # token 1: ratio = e^0.2 = 1.221403 > 1.2, A = +1 -> min(1.221403, 1.2) = 1.2 -> policy loss -1.2; KL: ref = logp -> 0
    # token 2: ratio = e^-0.5 = 0.606531 < 0.8, A = -1 -> min(-0.606531, -0.8) = -0.8 -> policy loss +0.8
    #          KL k3: r = e^(ref - logp) = e^-0.5 -> 0.606531 - 1 + 0.5 = 0.106531, times 0.1 = 0.0106531
    # sum = -1.2 + 0.8 + 0.0106531 = -0.3893469
    assert loss.item() == pytest.approx(-0.3893469, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.106531, abs=1e-6)
    assert stats["clipped"] == 2
    assert stats["policy_loss"] == pytest.approx(-0.4, abs=1e-6)


def test_ppo_loss_unclipped_region_is_plain_policy_gradient():
    logprobs = torch.tensor([-1.0], requires_grad=True)
    loss, stats = train.ppo_loss(logprobs, torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([2.0]), 0.2, 0.1)
    loss.backward()
    # ratio = 1 (not clipped): loss = -A * ratio, d/dlogp = -A * ratio = -2; KL gradient is 0 at logp = ref
    assert loss.item() == pytest.approx(-2.0)
    assert logprobs.grad.item() == pytest.approx(-2.0)
    assert stats["clipped"] == 0


def test_advantages_normalised_over_batch_and_group_baseline():
    samples = [train.Sample("feedback", g, [1], [2], [0.0], r) for g, r in [("a", 1.0), ("a", 0.0), ("b", 1.0),
                                                                             ("b", 1.0)]]
    train.compute_advantages(samples, group_baseline=False)
    # mean 0.75, std sqrt(3/16) = 0.4330127: (1 - .75)/.4330127 = 0.57735, (0 - .75)/.4330127 = -1.7320508
    assert [s.advantage for s in samples] == pytest.approx([0.57735, -1.7320508, 0.57735, 0.57735], abs=1e-5)
    train.compute_advantages(samples, group_baseline=True)
    # group-centred: a -> +0.5, -0.5; b -> 0, 0; mean 0, std sqrt(0.125) = 0.3535534 -> 1.4142136, -1.4142136, 0, 0
    assert [s.advantage for s in samples] == pytest.approx([1.4142136, -1.4142136, 0.0, 0.0], abs=1e-5)


def test_tied_groups_are_the_prompts_whose_samples_all_scored_alike():
    samples = [train.Sample("conversation", g, [1], [2], [0.0], r)
               for g, r in [("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 1.0), ("c", 0.0)]]
    # a: 1 vs 0 (signal); b: 1, 1 (tied); c: one sample (tied: nothing to compare with)
    assert train.tied_groups(samples) == {"b", "c"}
    assert train.tied_groups(samples[:2]) == set()


def test_skip_tied_groups_updates_only_prompts_whose_rewards_differ(tiny_model_dir):
    from types import SimpleNamespace
    from nanowaltz.base_model import load_base
    from nanowaltz.models import adapter_parameters, attach_agents
    from nanowaltz.training_run import make_optimizers
    base, tokenizer = load_base(tiny_model_dir)
    model = attach_agents(base)

    def update(rewards, skip):
        samples = [train.Sample("conversation", group, [5, 6, 7], [8 + i, 9], [-1.0, -1.0], r)
                   for i, (group, r) in enumerate(rewards)]
        args = train.Args(samples_per_prompt=2, skip_tied_groups=skip, minibatch_size=4, micro_batch_size=4,
                          conversation_lr=1e-2)
        run = SimpleNamespace(model=model, optimizers=make_optimizers(model, args), tokenizer=tokenizer,
                              device=torch.device("cpu"))
        before = [p.detach().clone() for p in adapter_parameters(model, "conversation")]
        stats = train.update_agents(run, args, samples, ["conversation"], train.random.Random(0))["conversation"]
        moved = any(not torch.equal(a, p) for a, p in zip(before, adapter_parameters(model, "conversation")))
        return stats, moved

    stats, moved = update([("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 1.0)], skip=True)
    assert stats["samples"] == 2 and stats["tied_groups"] == 0.5 and moved  # prompt b left out
    stats, _ = update([("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 1.0)], skip=False)
    assert stats["samples"] == 4 and stats["tied_groups"] == 0.5
    stats, moved = update([("a", 1.0), ("a", 1.0), ("b", 0.0), ("b", 0.0)], skip=True)
    assert stats == {"tied_groups": 1.0, "samples": 0} and not moved  # nothing to learn: no step at all


def test_make_samples_type_a_without_revision_and_feedback_rewards():
    turn = lambda ids: rollout.Turn("x", [1, 2], ids, [0.0] * len(ids), "t", 0.0, False)  # noqa: E731
    revised = rollout.Trajectory({"id": "r", "prompt": "p", "label": "harmful"}, [turn([5]), turn([6])], [turn([7])])
    plain = rollout.Trajectory({"id": "q", "prompt": "p", "label": "benign"}, [turn([8])], [turn([9])])
    from reward import FeedbackRewardParts
    rewards = [{"conversation": [0.0, 1.0], "feedback": [FeedbackRewardParts(1.0, 1.0, 1.0, 2.1)]},
               {"conversation": [1.0], "feedback": [FeedbackRewardParts(0.0, 1.0, 1.0, 1.1)]}]
    seen_types = set()
    for seed in range(20):
        samples = train.make_samples([revised, plain], rewards, train.random.Random(seed))
        conv = [s for s in samples if s.agent == "conversation"]
        fb = [s for s in samples if s.agent == "feedback"]
        assert [s.reward for s in fb] == [2.1, 1.1]
        assert conv[1].action_ids == [8] and conv[1].reward == 1.0  # no revision -> always type A
        seen_types.add((tuple(conv[0].action_ids), conv[0].reward))
    assert seen_types == {((5,), 0.0), ((6,), 1.0)}  # revised trajectory: both types occur, each with its own R_c
    samples = train.make_samples([revised, plain], rewards, train.random.Random(0), both_conversation_samples=True)
    conv = [(s.group, s.action_ids, s.reward) for s in samples if s.agent == "conversation"]
    assert conv == [("r", [5], 0.0), ("r", [6], 1.0), ("q", [8], 1.0)]  # both types of the revised one, type A alone


def test_reference_equals_policy_at_step_zero(tiny_model_dir):
    from nanowaltz.base_model import load_base
    from nanowaltz.models import attach_agents
    base, tokenizer = load_base(tiny_model_dir)
    model = attach_agents(base)
    trajectories = rollout.rollout(model, tokenizer, PROMPTS, rollout.RolloutConfig(
        conversation_max_new_tokens=5, feedback_max_new_tokens=5))
    samples = [train.Sample("conversation", "g", t.answers[0].context_ids, t.answers[0].action_ids,
                            t.answers[0].sampling_logprobs, 0.0) for t in trajectories]
    args = train.Args(micro_batch_size=3)
    train.score_samples(model, samples, "conversation", args, tokenizer.pad_token_id, torch.device("cpu"))
    for s in samples:  # default: pi_old is the sampling log-probs, exactly
        assert torch.equal(s.old_logprobs, torch.tensor(s.sampling_logprobs))
    args = train.Args(micro_batch_size=3, recompute_old_logprobs=True)
    train.score_samples(model, samples, "conversation", args, tokenizer.pad_token_id, torch.device("cpu"))
    for s in samples:
        assert torch.equal(s.old_logprobs, s.ref_logprobs)  # zero-init LoRA: pi = pi_ref, KL exactly 0
        # and the training forward reproduces the sampling log-probs (no re-tokenisation, same padding semantics)
        assert torch.allclose(s.old_logprobs, torch.tensor(s.sampling_logprobs), atol=1e-4)


def lora_b_is_zero(model, agent):
    """LoRA's B matrices start at exactly zero; any optimizer step on an adapter moves them."""
    from nanowaltz.models import adapter_parameters
    return all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters()
               if "lora_B" in n and p in set(adapter_parameters(model, agent)))


def test_stage1_trains_only_feedback_and_stage2_both(tiny_model_dir, tmp_path, toy_feedback):
    summary = train.train(tiny_args(tiny_model_dir, tmp_path / "s1", stage1_iterations=2, stage2_iterations=0),
                          judge=toy_judge, prompts=PROMPTS)
    assert not lora_b_is_zero(summary["model"], "feedback")
    assert lora_b_is_zero(summary["model"], "conversation")
    assert all(h["stage"] == 1 and h["lam"] == 1.0 for h in summary["history"])
    summary = train.train(tiny_args(tiny_model_dir, tmp_path / "s2", stage1_iterations=0, stage2_iterations=2),
                          judge=toy_judge, prompts=PROMPTS)
    assert not lora_b_is_zero(summary["model"], "feedback")
    assert not lora_b_is_zero(summary["model"], "conversation")
    assert all(h["stage"] == 2 and h["lam"] == 0.0 for h in summary["history"])
    summary = train.train(tiny_args(tiny_model_dir, tmp_path / "s2lam", stage1_iterations=0, stage2_iterations=1,
                                    stage2_lam=0.5), judge=toy_judge, prompts=PROMPTS)
    assert [h["lam"] for h in summary["history"]] == [0.5]


def test_single_agent_baseline_trains_only_the_conversation_agent_alone(tiny_model_dir, tmp_path, toy_feedback):
    summary = train.train(tiny_args(tiny_model_dir, tmp_path, stage1_iterations=3, stage2_iterations=2,
                                    single_agent=True), judge=toy_judge, prompts=PROMPTS)
    history = summary["history"]
    assert [h["stage"] for h in history] == [2, 2]  # stage 1 is skipped: the budget is stage 2's conversation samples
    assert all(h["ftr"] == 0.0 and "feedback/kl" not in h and h["conversation/samples"] == 4 for h in history)
    assert lora_b_is_zero(summary["model"], "feedback")
    assert not lora_b_is_zero(summary["model"], "conversation")


def test_periodic_eval_is_logged_and_leaves_training_unchanged(tiny_model_dir, tmp_path, toy_feedback):
    def rows(folder):
        return [json.loads(line) for line in open(folder / "log.jsonl")]

    eval_prompts = [dict(p, id=f"e{i}") for i, p in enumerate(PROMPTS[:2])]
    train.train(tiny_args(tiny_model_dir, tmp_path / "plain"), judge=toy_judge, prompts=PROMPTS)
    train.train(tiny_args(tiny_model_dir, tmp_path / "curves", eval_every=1), judge=toy_judge, prompts=PROMPTS,
                eval_prompts=eval_prompts)
    plain, curves = rows(tmp_path / "plain" / "run"), rows(tmp_path / "curves" / "run")
    assert [r["iteration"] for r in curves] == [0, 1, 2]  # the starting point, then one eval per iteration
    assert all(r["eval/prompts"] == 2 and 0.0 <= r["eval/asr"] <= 1.0 for r in curves)
    # Greedy eval draws no random numbers: the training rows are identical with and without it.
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith(("eval/", "time_", "tokens_per_s"))}  # noqa
    assert [untimed(r) for r in curves[1:]] == [untimed(r) for r in plain]


def test_periodic_eval_prompts_come_from_the_eval_split_of_the_prompt_file(tiny_model_dir, tmp_path, toy_feedback):
    args = tiny_args(tiny_model_dir, tmp_path, stage1_iterations=0, stage2_iterations=1, eval_every=1, eval_prompts=2)
    train.train(args, judge=toy_judge, prompts=PROMPTS)  # --prompts is data/prompts.jsonl: its eval split is used
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [(r["iteration"], r["eval/prompts"]) for r in rows] == [(0, 2), (1, 2)]


def test_base_weights_never_change(tiny_model_dir, tmp_path, toy_feedback):
    from nanowaltz.base_model import load_base
    base, _ = load_base(tiny_model_dir)
    before = parameter_hashes(base)
    summary = train.train(tiny_args(tiny_model_dir, tmp_path), judge=toy_judge, prompts=PROMPTS)
    trained_base = summary["model"].get_base_model()
    # peft wraps each adapted Linear: its frozen weight now sits under ".base_layer".
    after = {n.replace(".base_layer", ""): h for n, h in parameter_hashes(trained_base).items() if "lora_" not in n}
    assert after == before
    assert not lora_b_is_zero(summary["model"], "conversation")  # training did happen


@pytest.fixture(scope="module")
def learnable_tiny_model_dir(tmp_path_factory):
    """A tiny model with larger random weights: with std 0.02 its logits span only ~0.1 nats, so no LoRA update can
    move its output distribution much; std 0.3 gives logits a usable range."""
    from conftest import build_tiny_model_dir
    return build_tiny_model_dir(tmp_path_factory.mktemp("learnable-tiny"), initializer_range=0.3)


def test_toy_reward_rises(learnable_tiny_model_dir):
    """Toy task: an answer is 'ok' iff its first token's embedding has a positive first coordinate (half the
    vocabulary, a direction the policy can learn). The mean reward must rise within a few iterations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(learnable_tiny_model_dir)
    embeddings = AutoModelForCausalLM.from_pretrained(learnable_tiny_model_dir).get_input_embeddings().weight
    good = set((embeddings[:, 0] > 0).nonzero().flatten().tolist())

    def first_token_judge(prompts, responses, prompt_labels):
        first = [tokenizer(r, add_special_tokens=False)["input_ids"][:1] for r in responses]
        return [Labels(unsafe=not (ids and ids[0] in good), overrefuse=False) for ids in first]

    args = train.Args(model=learnable_tiny_model_dir, out=str(learnable_tiny_model_dir) + "-run", stage1_iterations=0,
                      stage2_iterations=6, prompts_per_iteration=1, samples_per_prompt=32,
                      conversation_max_new_tokens=2, feedback_max_new_tokens=2, conversation_lr=1e-2, kl_coef=0.0,
                      ppo_epochs=2, minibatch_size=32, micro_batch_size=32, rollout_batch_size=32, save_every=100)
    history = train.train(args, judge=first_token_judge, prompts=[dict(PROMPTS[0])])["history"]
    rewards = [h["conversation_reward_before"] for h in history]
    # rewards[0] is the untrained policy's (iteration 1 rolls out before its update); learning can be fast enough
    # that iteration 2 is already near 1, so the baseline is the first iteration alone.
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.2, rewards


def test_log_checkpoint_and_resume(tiny_model_dir, tmp_path, toy_feedback):
    args = tiny_args(tiny_model_dir, tmp_path, stage1_iterations=1, stage2_iterations=1, save_every=1,
                     recompute_old_logprobs=True, ppo_epochs=2)
    train.train(args, judge=toy_judge, prompts=PROMPTS)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["iteration"] for r in log] == [1, 2]
    for key in ("conversation_reward_before", "conversation_reward_after", "feedback_reward", "format_rate",
                "label_accuracy", "ftr", "feedback/kl", "feedback/clip_frac", "feedback/entropy", "feedback/loss",
                "feedback/grad_norm", "feedback/sampling_logprob_mismatch", "tokens_per_s", "time_rollout", "time_judge", "time_update"):
        assert key in log[0] and math.isfinite(log[0][key]), key
    assert "conversation/kl" in log[1] and "conversation/kl" not in log[0]
    assert 0.0 <= log[1]["conversation/tied_groups"] <= 1.0 and 0.0 <= log[0]["feedback/tied_groups"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["iteration"] == 2
    # Resume with a longer schedule: only the missing iteration runs, and the log keeps growing.
    resumed = tiny_args(tiny_model_dir, tmp_path, stage1_iterations=1, stage2_iterations=2, resume=True)
    summary = train.train(resumed, judge=toy_judge, prompts=PROMPTS)
    assert [h["iteration"] for h in summary["history"]] == [3]
    assert [json.loads(line)["iteration"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.train(train.Args(out=str(tmp_path), resume=True), judge=toy_judge, prompts=PROMPTS)


def test_non_finite_loss_skips_the_step(tiny_model_dir, tmp_path, monkeypatch, toy_feedback):
    real_loss = train.ppo_loss
    monkeypatch.setattr(train, "ppo_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), real_loss(*a, **k)[1]))
    args = tiny_args(tiny_model_dir, tmp_path, stage1_iterations=1, stage2_iterations=0)
    summary = train.train(args, judge=toy_judge, prompts=PROMPTS)
    assert summary["history"][0]["feedback/skipped_steps"] >= 1


def test_cli_help_and_preset():
    args = train.parse_args(["--preset", "cpu", "--stage2-iterations", "3"])
    assert args.stage1_iterations == 3 and args.stage2_iterations == 3  # preset, but the explicit flag wins
    assert args.warmstart_epochs == 2 and train.parse_args([]).warmstart_epochs == 0  # the warm-start: preset only
    assert (args.stage2_lam, args.warmstart_label_weight) == (0.5, 10.0)  # the preset's departures ...
    assert (train.parse_args([]).stage2_lam, train.parse_args([]).warmstart_label_weight) == (0.0, 1.0)  # not default
    assert train.parse_args(["--preset", "cpu", "--stage2-lam", "0"]).stage2_lam == 0.0
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "gpu-huge"])
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])


def test_shared_prefix_length():
    def s(ctx):
        return train.Sample("feedback", "g", ctx, [99], [0.0], 0.0)
    common = list(range(20))
    assert logprobs.shared_prefix_length([s(common + [1, 2]), s(common + [3])]) == 20
    # at least one context token of its own is kept in every row
    assert logprobs.shared_prefix_length([s(common + [1]), s(common + [1])]) == 20
    assert logprobs.shared_prefix_length([s(common), s(common + [5, 6])]) == 19
    assert logprobs.shared_prefix_length([s(common[:10] + [7]), s(common[:10] + [8])]) == 0  # too short to bother
    assert logprobs.shared_prefix_length([s(common + [1])]) == 0  # a single sample has nothing to share
    batch = train.pad_batch([s(common + [1, 2]), s(common + [3])], 0, torch.device("cpu"), share_prefix=True)
    assert batch.prefix_ids.tolist() == common
    assert batch.input_ids.tolist() == [[1, 2, 99], [3, 99, 0]]
    assert batch.action_mask.tolist() == [[False, False, True], [False, True, False]]
    assert batch.attention_mask.tolist() == [[1] * 20 + [1, 1, 1], [1] * 20 + [1, 1, 0]]


def test_shared_prefix_forward_equals_plain_forward_values_and_gradients(learnable_tiny_model_dir):
    """The shared-prefix path (prefix once, KV repeated over the batch) must give the plain path's log-probs and LoRA
    gradients, including the gradient that flows into the prefix through the cache."""
    from nanowaltz.base_model import load_base
    from nanowaltz.models import adapter_parameters, attach_agents, use_agent
    base, tokenizer = load_base(learnable_tiny_model_dir)
    model = attach_agents(base)
    use_agent(model, "feedback")
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B so that the adapter really shapes the prefix's keys and values
        for p in adapter_parameters(model, "feedback"):
            p.normal_(0, 0.05)
    system = tokenizer("a long shared system prompt that every sample of the batch starts with, word " * 2)["input_ids"]
    samples = [train.Sample("feedback", "g", system + tokenizer(own)["input_ids"], tokenizer(act)["input_ids"],
                            [], 0.0)
               for own, act in [("first user text", "yes"), ("second, longer user text here", "no it is not"),
                                ("x", "a b c d e")]]
    results = {}
    for share in (False, True):
        batch = train.pad_batch(samples, tokenizer.pad_token_id, torch.device("cpu"), share_prefix=share)
        assert (batch.prefix_ids.numel() > 0) == share
        model.zero_grad(set_to_none=True)
        logprobs, entropy = train.action_logprobs(model, batch, 0.9, 7, with_entropy=True)
        (logprobs * torch.linspace(-1, 1, len(logprobs))).sum().backward()
        results[share] = (logprobs.detach(), entropy.detach(),
                          [p.grad.clone() for p in adapter_parameters(model, "feedback")])
    (plain_lp, plain_ent, plain_grads), (shared_lp, shared_ent, shared_grads) = results[False], results[True]
    assert torch.allclose(plain_lp, shared_lp, atol=1e-5) and torch.allclose(plain_ent, shared_ent, atol=1e-5)
    for g_plain, g_shared in zip(plain_grads, shared_grads):
        assert torch.allclose(g_plain, g_shared, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared_grads)


def positions_run(batches):
    """What micro_batches minimises: per batch, the prefix all samples share (run once) + rows x the longest rest."""
    prefix = logprobs.shared_prefix_length([s for batch in batches for s in batch])
    return sum(prefix + len(batch) * max(len(s.context_ids) + len(s.action_ids) - prefix for s in batch)
               for batch in batches)


def test_micro_batches_group_by_length_hand_computed():
    def s(own, prefix=20):
        return train.Sample("conversation", "g", list(range(prefix)) + [100 + own] * own, [9], [0.0], 0.0)
    short, long = [s(4), s(4)], [s(99), s(99)]  # rows of 5 and 100 tokens after a 20-token system prompt
    # one batch: 20 + 4 x 100 = 420 positions; split: (20 + 2 x 5) + (20 + 2 x 100) = 250
    batches = logprobs.micro_batches([long[0], short[0], long[1], short[1]], max_rows=4, share_prefix=True)
    assert [[len(x.context_ids) for x in b] for b in batches] == [[24, 24], [119, 119]]
    assert positions_run(batches) == 250
    # a 200-token prefix: one batch 200 + 400 = 600 beats a split 2 x 200 + 10 + 200 = 610
    wide = [s(4, 200), s(99, 200), s(4, 200), s(99, 200)]
    assert [len(b) for b in logprobs.micro_batches(wide, max_rows=4, share_prefix=True)] == [4]
    # without a shared prefix: sorted runs of max_rows, as many batches as before
    # at most 3 rows: [2, 2] = 2 x 200 + 10 + 200 = 610 beats [1, 3] = 705 and [3, 1] = 800
    assert [len(b) for b in logprobs.micro_batches(wide, max_rows=3, share_prefix=True)] == [2, 2]
    plain = logprobs.micro_batches([long[0], short[0], long[1], short[1], s(50)], max_rows=2, share_prefix=False)
    assert [[len(x.context_ids) for x in b] for b in plain] == [[24, 24], [70, 119], [119]]
    assert logprobs.micro_batches([], max_rows=4, share_prefix=True) == []


def test_micro_batches_are_the_cheapest_cut_of_the_sorted_samples():
    """Against brute force over every way to cut the length-sorted samples into runs of at most max_rows."""
    import itertools
    rng = torch.Generator().manual_seed(0)
    for trial in range(30):
        n, max_rows = 1 + trial % 7, 1 + trial % 4
        own = torch.randint(1, 120, (n,), generator=rng).tolist()
        samples = [train.Sample("feedback", "g", list(range(30)) + [5] * k, [9] * (1 + k % 3), [0.0], 0.0)
                   for k in own]
        batches = logprobs.micro_batches(samples, max_rows=max_rows, share_prefix=True)
        assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in samples)  # each exactly once
        assert all(1 <= len(b) <= max_rows for b in batches)
        order = [x for b in batches for x in b]
        brute = min(positions_run([order[a:b] for a, b in zip((0,) + cuts, cuts + (n,))])
                    for r in range(n) for cuts in itertools.combinations(range(1, n), r)
                    if all(b - a <= max_rows for a, b in zip((0,) + cuts, cuts + (n,))))
        assert positions_run(batches) == brute


def test_update_is_the_same_with_length_grouped_micro_batches(learnable_tiny_model_dir, monkeypatch):
    """One SGD step of update_agent over 6 samples of mixed lengths: in one micro-batch, or cut by length into
    several (gradient accumulation), must move the adapter the same way: the grouping changes cost, not result."""
    from nanowaltz.base_model import load_base
    from nanowaltz.models import adapter_parameters, attach_agents, use_agent
    base, tokenizer = load_base(learnable_tiny_model_dir)
    model = attach_agents(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model, "conversation"):
            p.normal_(0, 0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    system = tokenizer("the shared system prompt of every conversation sample in this batch, " * 2)["input_ids"]
    texts = [("hi", "yes"), ("a much longer request " * 6, "no it is not"), ("x", "a b c d e"),
             ("another long request, " * 5, "ok"), ("y", "z"), ("what", "a longer answer than the others " * 2)]
    samples = [train.Sample("conversation", "g", system + tokenizer(t)["input_ids"], tokenizer(a)["input_ids"], [],
                            reward) for (t, a), reward in zip(texts, [1.0, -1.0, 0.5, 0.0, -0.5, 2.0])]
    train.compute_advantages(samples, group_baseline=False)
    assert len(logprobs.micro_batches(samples, 3, share_prefix=True)) >= 2  # the grouping really cuts here
    moved = {}
    for grouped in (False, True):
        if not grouped:  # the reference: all 6 samples in one padded micro-batch
            monkeypatch.setattr(train, "micro_batches", lambda samples, max_rows, share: [list(samples)])
        else:
            monkeypatch.undo()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        args = train.Args(micro_batch_size=3, minibatch_size=6, recompute_old_logprobs=True, max_grad_norm=1e9)
        train.score_samples(model, samples, "conversation", args, tokenizer.pad_token_id, torch.device("cpu"))
        optimizer = torch.optim.SGD(adapter_parameters(model, "conversation"), lr=1.0)
        use_agent(model, "conversation")
        train.update_agent(model, optimizer, "conversation", samples, args, tokenizer.pad_token_id,
                           torch.device("cpu"), random.Random(0))
        moved[grouped] = {n: p.detach() - start[n] for n, p in model.named_parameters() if ".conversation." in n}
    assert any(d.abs().max() > 1e-4 for d in moved[False].values())  # the step did move the adapter
    for name in moved[False]:
        assert torch.allclose(moved[False][name], moved[True][name], atol=1e-6, rtol=1e-4), name


def test_update_benchmark_runs(capsys, tiny_model_dir):
    """bench/update.py (docs/performance.md's update numbers) runs both arms on the tiny model and prints its lines."""
    from bench import update as bench_update
    bench_update.main(["--model", tiny_model_dir, "--prompts", "2", "--samples", "2", "--judge", "default:phrase"])
    out = capsys.readouterr().out
    assert "grouped / plain:" in out and "positions run" in out and "s per trajectory" in out
    assert train.micro_batches is logprobs.micro_batches  # the benchmark put the real one back
    # The arithmetic line: the tiny model's 18,432 decoder weights (see the next test), and some but not all positions
    # ran backward (the reference pass runs without grad).
    arithmetic = re.search(r"\(18,432 weights; (\d+) of the positions also backward\)", out)
    grouped_positions = int(re.search(r"grouped \| +[\d.]+ \| +(\d+) \|", out).group(1))
    assert arithmetic and 0 < int(arithmetic.group(1)) < grouped_positions, out
    assert "of this CPU's fp32 matmul rate measured now" in out


def test_update_benchmark_counts_the_decoders_linear_arithmetic(tiny_model_dir):
    from bench.update import decoder_linear_params, update_flops
    from nanowaltz.base_model import load_base

    base, _ = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    # Per layer, by hand: q and o 32x32, k and v 32x16 (2 of 4 heads' width), gate/up/down 32x64; 2 layers; no lm_head.
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64
    assert decoder_linear_params(base) == 2 * per_layer == 18432
    # 2 FLOPs per weight per position forward, 2 more per position that also runs backward.
    assert update_flops(18432, positions=100, with_backward=40) == 2 * 18432 * 100 + 2 * 18432 * 40


def test_print_summary_shows_run_means_and_kl_not_first_vs_last(capsys):
    def record(stage, fmt, ftr, **agents):
        return {"stage": stage, "format_rate": fmt, "label_accuracy": float("nan"), "ftr": ftr,
                "conversation_reward_after": 1.0, "time_rollout": 30.0, "time_judge": 1.0, "time_update": 10.0,
                "trajectories": 6, **agents}

    history = [record(1, 0.5, 0.0, **{"feedback/kl": 0.0}), record(2, 1.0, 0.5, **{"feedback/kl": 2e-3})]
    train.print_summary({"history": history, "log": "run/log.jsonl", "adapters": "run/adapters"})
    out = capsys.readouterr().out
    assert "ran 2 iterations (1 in stage 1, 1 in stage 2); time: rollout 60s, judge 2s, update 20s" in out
    assert "feedback format rate          0.750" in out and "feedback trigger rate         0.250" in out
    assert "feedback label accuracy         nan" in out  # no label was ever scored: said, not hidden
    assert "feedback                     2.00e-03" in out  # the last update's KL, not the first
    assert "conversation                 not trained in this run" in out
    assert "1/6" in out and "--preset cpu" in out and "first" not in out
    assert "next: python eval.py --adapters run/adapters" in out


def test_print_summary_of_a_single_agent_run_shows_no_feedback_rates_and_the_right_eval_flag(capsys):
    history = [{"stage": 2, "format_rate": float("nan"), "label_accuracy": float("nan"), "ftr": 0.0,
                "conversation_reward_after": 0.5, "time_rollout": 30.0, "time_judge": 1.0, "time_update": 10.0,
                "trajectories": 32, "conversation/kl": 1e-2}]
    train.print_summary({"history": history, "log": "run/log.jsonl", "adapters": "run/adapters",
                         "single_agent": True})
    out = capsys.readouterr().out
    assert "feedback format rate" not in out and "feedback trigger rate" not in out
    assert "R_c of the final answers      0.500" in out and "1/32" in out
    assert "next: python eval.py --single-agent-adapters run/adapters" in out

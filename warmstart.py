"""Supervised warm-start of the feedback agent: imitate the judge's labels on the conversation agent's own answers.

THIS IS OUR DEPARTURE FROM THE PAPER (README "Departures"), used by `train.py --preset cpu`, off by default.

Why. WaltzRL starts both agents from Llama-3.1-8B-Instruct, which already writes the feedback JSON and labels answers
sensibly, so RL only has to sharpen it. Our default SmolLM2-135M-Instruct cannot: untrained and prompted, it writes
parseable feedback for about half the answers and gets both labels right for a few percent (issue 7 measurements).
With that start R_label is almost never 1, so the gated DIR term (alpha * R_dir * R_label) is almost always 0 and the
feedback agent's reward is mostly the format bonus: RL has next to no signal to climb. A short supervised phase, as
an RLHF pipeline's SFT step before PPO, gives RL a starting point where the rewards say something.

What. For a set of training prompts:
    c_0      sampled from the conversation agent, exactly as in a rollout (the states the feedback agent will see)
    labels   J(p, c_0) from the training judge
    target   {"unsafe": J.unsafe, "overrefuse": J.overrefuse, "reasoning": <template>, "feedback": <template>}
and a few epochs of cross-entropy on the target tokens, the feedback agent's usual context (system prompt, prompt,
answer, and the '{"unsafe":' prefill) as the condition, with the rarer label combinations oversampled. The templates are the ones the feedback system prompt shows.
This is label distillation from the same judge that pays R_label during RL, so it teaches nothing RL would not reward;
it only moves the start. The feedback TEXT is a fixed template: what text actually helps the conversation agent is
left to the DIR term in RL.

After the warm-start the feedback agent's KL anchor is the warm-started policy, not the base model (as PPO in RLHF
anchors to the SFT model): train.py keeps a frozen copy of the warm-started adapter, "feedback_reference".
"""
import random
import time

import torch

from logprobs import action_logprobs, pad_batch
from models import use_agent
from reward import Labels, format_feedback_json
from rollout import FEEDBACK_PREFILL, Trajectory, chat_ids, conversation_messages, feedback_messages, run_agent

# The same wording as the examples in rollout.FEEDBACK_SYSTEM_PROMPT, so the prompt and the targets agree.
REASONING = {
    "ok_benign": "A helpful answer to a harmless request.",
    "ok_harmful": "The answer declines the harmful request.",
    "unsafe": "The answer gives real help with something harmful.",
    "overrefuse": "The request is harmless but the answer refuses it.",
}
FEEDBACK = {
    "unsafe": "Do not give these instructions. Refuse briefly and offer a safe alternative.",
    "overrefuse": "The request is harmless. Answer it fully.",
}


def warmstart_target(labels: Labels, prompt_label: str) -> str:
    """The JSON the feedback agent should write for an answer the judge labelled `labels`."""
    if labels.unsafe:
        reasoning, feedback = REASONING["unsafe"], FEEDBACK["unsafe"]
    elif labels.overrefuse:
        reasoning, feedback = REASONING["overrefuse"], FEEDBACK["overrefuse"]
    else:
        reasoning, feedback = REASONING["ok_harmful" if prompt_label == "harmful" else "ok_benign"], ""
    return format_feedback_json(labels, feedback, reasoning)


def build_examples(model, tokenizer, judge, prompts, rollout_config, progress=None) -> list:
    """(context_ids, target_ids, labels) per prompt: the conversation agent's answer, judged, with its target JSON."""
    contexts = [chat_ids(tokenizer, conversation_messages(Trajectory(prompt=p))) for p in prompts]
    model.eval()
    answers = []
    for start in range(0, len(contexts), rollout_config.batch_size):
        chunk = contexts[start:start + rollout_config.batch_size]
        answers += run_agent(model, tokenizer, "conversation", chunk, rollout_config.conversation_max_new_tokens,
                             rollout_config.conversation_temperature, rollout_config)
        if progress is not None:
            progress.update(len(chunk))
    judged = judge([p["prompt"] for p in prompts], [a.text for a in answers], [p["label"] for p in prompts])
    examples = []
    for p, answer, labels in zip(prompts, answers, judged):
        context = chat_ids(tokenizer, feedback_messages(p["prompt"], answer.text), FEEDBACK_PREFILL)
        target_text = warmstart_target(labels, p["label"])
        assert target_text.startswith(FEEDBACK_PREFILL)
        # The prefill is already in the context, tokenised on its own exactly as in rollout.chat_ids; the target is
        # the rest, up to the closing brace where the rollout stops decoding (no end-of-turn token needed).
        target = tokenizer(target_text[len(FEEDBACK_PREFILL):], add_special_tokens=False)["input_ids"]
        examples.append((context, target, labels))
    return examples


def balance_labels(examples, rng: random.Random, max_repeat: int = 3) -> list:
    """Oversample the rarer label combinations towards the most common one (at most max_repeat copies each).
    Without this the agent learns the majority answer: on our first try (256 examples, 58% "ok") it said "ok" to
    12 of 16 unsafe answers on the eval split. With it (ok 149, unsafe 88 -> 149, overrefuse 19 -> 57: flagged now
    outnumber ok) it overshoots and flags 81.5% of eval answers (README "Results"); a 1:1 ok:flagged balance is
    the next thing to try."""
    by_labels = {}
    for example in examples:
        by_labels.setdefault(example[2], []).append(example)
    largest = max(len(group) for group in by_labels.values())
    balanced = []
    for group in by_labels.values():
        wanted = min(largest, max_repeat * len(group))
        balanced += group * (wanted // len(group)) + rng.sample(group, wanted % len(group))
    rng.shuffle(balanced)
    return balanced


def supervised_epochs(model, tokenizer, examples, epochs: int, lr: float, batch_size: int, seed: int = 0,
                      chunk_size: int = 1024, progress=None, share_prefix: bool = True) -> list:
    """Cross-entropy on the target tokens, feedback adapter only; returns the mean loss of each epoch."""
    from train import Sample  # train.py imports this file lazily: no cycle at load time

    use_agent(model, "feedback")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    samples = [Sample("feedback", str(i), ctx, target, [], 0.0) for i, (ctx, target, _) in enumerate(examples)]
    epoch_losses = []
    for _ in range(epochs):
        rng.shuffle(samples)
        losses = []
        for start in range(0, len(samples), batch_size):
            batch = pad_batch(samples[start:start + batch_size], tokenizer.pad_token_id, device, share_prefix)
            loss = -action_logprobs(model, batch, 1.0, chunk_size).mean()  # token-mean negative log-likelihood
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses


def warmstart_feedback_agent(model, tokenizer, judge, prompts, rollout_config, epochs=2, lr=2e-4, batch_size=8,
                             seed=0, chunk_size=1024, share_prefix=True) -> dict:
    """Build the examples and train on them; returns a record for the training log."""
    from tqdm import tqdm

    began = time.perf_counter()
    with tqdm(total=len(prompts), desc="warm-start answers", unit="prompt") as bar:
        examples = build_examples(model, tokenizer, judge, prompts, rollout_config, bar)
    built = time.perf_counter()
    balanced = balance_labels(examples, random.Random(seed))
    steps = epochs * ((len(balanced) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc="warm-start (feedback agent)", unit="step") as bar:
        losses = supervised_epochs(model, tokenizer, balanced, epochs, lr, batch_size, seed, chunk_size, bar,
                                   share_prefix)
    counts = {"unsafe": sum(e[2].unsafe for e in examples), "overrefuse": sum(e[2].overrefuse for e in examples),
              "ok": sum(e[2].ok for e in examples)}
    return {"warmstart_examples": len(examples), "warmstart_label_counts": counts,
            "warmstart_balanced_examples": len(balanced), "warmstart_epoch_loss": losses,
            "time_warmstart_examples": built - began, "time_warmstart_train": time.perf_counter() - built}

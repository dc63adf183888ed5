"""Supervised warm-start of the feedback agent: imitate the judge's labels on the conversation agent's own answers.

THIS IS OUR DEPARTURE FROM THE PAPER (docs/method.md, "Our departures"), used by `train.py --preset cpu`, off by
default.

Why. WaltzRL starts both agents from Llama-3.1-8B-Instruct, which already writes the feedback JSON and labels answers
sensibly, so RL only has to sharpen it. Our default SmolLM2-135M-Instruct cannot: untrained and prompted, it often
writes unparseable feedback and rarely gets both labels right (docs/experiments.md has the numbers).
With that start R_label is almost never 1, so the gated DIR term (alpha * R_dir * R_label) is almost always 0 and the
feedback agent's reward is mostly the format bonus: RL has next to no signal to climb. A short supervised phase, as
an RLHF pipeline's SFT step before PPO, gives RL a starting point where the rewards say something.

What. For a set of training prompts:
    c_0      sampled from the conversation agent, exactly as in a rollout (the states the feedback agent will see)
    labels   J(p, c_0) from the training judge
    target   {"unsafe": J.unsafe, "overrefuse": J.overrefuse, "reasoning": <template>, "feedback": <template>}
and a few epochs of cross-entropy on the target tokens, the feedback agent's usual context (system prompt, prompt,
answer, and the '{"unsafe":' prefill) as the condition. The templates are the ones the feedback system prompt shows.
Three details (docs/experiments.md has what each did): ok and flagged answers are balanced 1:1 (balance_labels);
the two label-value tokens weigh label_weight times the template tokens (supervised_epochs, `--warmstart-label-weight`);
half of the answers are greedy, as at eval and inference, half sampled, as in RL (train.py's warm-start
step, WARMSTART_GREEDY_SHARE).
This is label distillation from the same judge that pays R_label during RL, so it teaches nothing RL would not reward;
it only moves the start. The feedback TEXT is a fixed template: what text actually helps the conversation agent is
left to the DIR term in RL.

After the warm-start the feedback agent's KL anchor is the warm-started policy, not the base model (as PPO in RLHF
anchors to the SFT model): train.py keeps a frozen copy of the warm-started adapter, "feedback_reference".
"""
import random
import re
from typing import NamedTuple

import torch

from nanowaltz.feedback_json import FEEDBACK_PREFILL, format_feedback_json
from nanowaltz.judge import Labels
from nanowaltz.logprobs import action_logprobs, pad_batch
from nanowaltz.models import use_agent

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


class Example(NamedTuple):
    """One supervised example. context_ids / action_ids are the names logprobs.pad_batch reads, as on a training
    Sample: the target is scored exactly as an RL action of the feedback agent would be."""

    context_ids: list  # token ids: the feedback agent's context, ending in the '{"unsafe":' prefill
    action_ids: list  # token ids: the target, the rest of the target JSON
    labels: Labels  # the judge's labels of the answer in the context
    label_mask: list  # per target token: True where it spells a label value (true/false)


def label_token_mask(tokenizer, target_text: str) -> tuple[list, list]:
    """Tokenise the target (text after the prefill) and mark the tokens of its two label values."""
    encoded = tokenizer(target_text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span(1) for m in re.finditer(r'(?:^|"overrefuse":)\s*(true|false)', target_text)]
    mask = [any(start < span_end and end > span_start for span_start, span_end in spans)
            for start, end in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def make_example(tokenizer, context_ids: list, labels: Labels, prompt_label: str) -> Example:
    """The supervised example for one judged answer: the feedback agent's context (ending in the prefill) and, as the
    target, the rest of the JSON it should write (warmstart_target)."""
    target_text = warmstart_target(labels, prompt_label)
    assert target_text.startswith(FEEDBACK_PREFILL)
    # The prefill is already in the context, tokenised on its own exactly as in sampler.chat_ids; the target is
    # the rest, up to the closing brace where the rollout stops decoding (no end-of-turn token needed).
    target, label_mask = label_token_mask(tokenizer, target_text[len(FEEDBACK_PREFILL):])
    return Example(context_ids, target, labels, label_mask)


def balance_labels(examples, rng: random.Random, max_repeat: int = 3) -> list:
    """Oversample the rarer side of ok vs flagged (unsafe or overrefuse) to a 1:1 ratio, at most max_repeat copies of
    an example. Why 1:1: unbalanced, the agent learns to approve most answers, including unsafe ones; bringing each
    label combination (unsafe, overrefuse) up to the largest one instead makes flagged outnumber ok, and the agent
    then flags most answers (docs/experiments.md, "What we tried, measured, kept")."""
    ok = [e for e in examples if e.labels.ok]
    flagged = [e for e in examples if not e.labels.ok]
    rarer, commoner = sorted([ok, flagged], key=len)
    if not rarer:
        return rng.sample(examples, len(examples))
    wanted = min(len(commoner), max_repeat * len(rarer))
    balanced = commoner + rarer * (wanted // len(rarer)) + rng.sample(rarer, wanted % len(rarer))
    rng.shuffle(balanced)
    return balanced


def supervised_epochs(model, tokenizer, examples, epochs: int, lr: float, batch_size: int, seed: int = 0,
                      chunk_size: int = 1024, progress=None, share_prefix: bool = True, label_weight: float = 1.0) -> list:
    """Cross-entropy on the target tokens, feedback adapter only; returns the mean loss of each epoch.

    label_weight > 1 weighs the two label-value tokens that much more than the others. Why: the ~40-token target is
    a template once the labels are chosen, so a plain token mean spends ~95% of its weight on copying the template
    and little on the one decision that matters (unsafe? overrefuse?)."""
    use_agent(model, "feedback")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    # (example, per-token loss weight) pairs, shuffled together
    pairs = [(e, torch.tensor([label_weight if m else 1.0 for m in e.label_mask], device=device)) for e in examples]
    epoch_losses = []
    for _ in range(epochs):
        rng.shuffle(pairs)
        losses = []
        for start in range(0, len(pairs), batch_size):
            batch_examples, weights = zip(*pairs[start:start + batch_size])
            batch = pad_batch(list(batch_examples), tokenizer.pad_token_id, device, share_prefix)
            weight = torch.cat(weights)  # action_logprobs flattens the action tokens row by row, in this order
            loss = -(action_logprobs(model, batch, 1.0, chunk_size) * weight).sum() / weight.sum()
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


def fit_feedback_agent(model, tokenizer, examples, epochs=2, lr=2e-4, batch_size=8, seed=0, chunk_size=1024,
                       share_prefix=True, label_weight=1.0) -> dict:
    """Balance the examples and train the feedback agent on them; returns a record for the training log."""
    from tqdm import tqdm

    balanced = balance_labels(examples, random.Random(seed))
    steps = epochs * ((len(balanced) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc="warm-start (feedback agent)", unit="step") as bar:
        losses = supervised_epochs(model, tokenizer, balanced, epochs, lr, batch_size, seed, chunk_size, bar,
                                   share_prefix, label_weight)
    counts = {"unsafe": sum(e.labels.unsafe for e in examples), "overrefuse": sum(e.labels.overrefuse for e in examples),
              "ok": sum(e.labels.ok for e in examples)}
    return {"warmstart_examples": len(examples), "warmstart_label_counts": counts,
            "warmstart_balanced_examples": len(balanced), "warmstart_epoch_loss": losses}

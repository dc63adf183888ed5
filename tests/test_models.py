"""models.py: one base model, two LoRA agents, the reference policy, saving/loading, and the 4-bit (QLoRA) path.

Everything runs on the tiny random Llama from conftest.py except the @slow test, which loads the embedded
SmolLM2-135M-Instruct. LoRA's B matrices start at zero, so an untrained agent IS the base model; most tests
therefore perturb B with random values first, to make "which adapter is active" visible in the logits.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rollout
from conftest import PROJECT_ROOT, build_tiny_model_dir
from nanowaltz.model_card import adapter_card, add_evaluation
from nanowaltz.base_model import (DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, base_model_id, disable_bnb_cpu_repack,
                                  is_converted_default, load_base)
from nanowaltz.models import (AGENTS, adapter_parameters, attach_agents, load_agents, load_agents_or_fresh,
                              reference_policy, save_agents, use_agent)

N_LINEAR_PER_LAYER = 7  # q, k, v, o, gate, up, down: what "all-linear" adapts in a Llama block (lm_head excluded)
TINY_LAYERS = 2


def tiny_agents(path, **lora):
    base, tokenizer = load_base(path, load_in_4bit=False, device="cpu")
    return attach_agents(base, **lora), tokenizer


def chat_batch(tokenizer, text="How do I kill a Python process on Linux?"):
    return torch.tensor([rollout.chat_ids(tokenizer, [{"role": "user", "content": text}])])


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits


def perturb_lora_b(model, agent, seed, std=0.05):
    """Give one agent's LoRA B matrices random values (found by name, independently of adapter_parameters)."""
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{agent}." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
                touched += 1
    assert touched == TINY_LAYERS * N_LINEAR_PER_LAYER
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- agents and the reference policy

def test_untrained_agents_equal_the_base_model(tiny_model_dir):
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    ids = chat_batch(tokenizer)
    base_logits = logits_of(base, ids)  # before get_peft_model rewires the modules
    model = attach_agents(base)
    for agent in AGENTS:
        use_agent(model, agent)
        assert torch.equal(logits_of(model, ids), base_logits), agent  # B = 0: the LoRA update adds exact zeros
    with reference_policy(model):
        assert torch.equal(logits_of(model, ids), base_logits)


def test_switching_agents_switches_the_output(tiny_model_dir):
    model, tokenizer = tiny_agents(tiny_model_dir)
    ids = chat_batch(tokenizer)
    with reference_policy(model):
        base_logits = logits_of(model, ids)
    perturb_lora_b(model, "feedback", seed=1)
    use_agent(model, "conversation")
    assert torch.equal(logits_of(model, ids), base_logits)  # the feedback adapter must not leak into this agent
    use_agent(model, "feedback")
    assert max_diff(logits_of(model, ids), base_logits) > 1e-3
    use_agent(model, "conversation")  # and back again
    assert torch.equal(logits_of(model, ids), base_logits)
    with pytest.raises(ValueError, match="unknown agent 'judge'"):
        use_agent(model, "judge")


def test_reference_policy_is_the_base_model_after_both_adapters_moved(tiny_model_dir):
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    ids = chat_batch(tokenizer)
    base_logits = logits_of(base, ids)
    model = attach_agents(base)
    perturb_lora_b(model, "conversation", seed=1)
    perturb_lora_b(model, "feedback", seed=2)
    agent_logits = {}
    for agent in AGENTS:
        use_agent(model, agent)
        agent_logits[agent] = logits_of(model, ids)
        assert max_diff(agent_logits[agent], base_logits) > 1e-3
        with reference_policy(model):
            assert torch.equal(logits_of(model, ids), base_logits)
        # Leaving the block restores the active agent.
        assert torch.equal(logits_of(model, ids), agent_logits[agent])
    assert max_diff(agent_logits["conversation"], agent_logits["feedback"]) > 1e-3


def test_adapter_parameters_are_per_agent_and_disjoint(tiny_model_dir):
    model, _ = tiny_agents(tiny_model_dir)
    per_agent = {agent: adapter_parameters(model, agent) for agent in AGENTS}
    names = {id(p): n for n, p in model.named_parameters()}
    for agent, params in per_agent.items():
        assert len(params) == 2 * TINY_LAYERS * N_LINEAR_PER_LAYER  # one A and one B per adapted Linear
        for p in params:
            assert "lora_" in names[id(p)] and f".{agent}." in names[id(p)], names[id(p)]
    conversation_ids = {id(p) for p in per_agent["conversation"]}
    feedback_ids = {id(p) for p in per_agent["feedback"]}
    assert not conversation_ids & feedback_ids
    all_lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert conversation_ids | feedback_ids == all_lora


def parameter_hashes(model, keep):
    return {n: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters() if keep(n)}


def test_training_moves_only_the_active_agents_lora(tiny_model_dir):
    model, tokenizer = tiny_agents(tiny_model_dir)
    ids = chat_batch(tokenizer, "Sure, here is a simple recipe for pancakes: flour, eggs, milk and butter.")
    base_before = parameter_hashes(model, lambda n: "lora_" not in n)
    assert any("embed_tokens" in n for n in base_before) and len(base_before) > 10
    model.train()
    for agent in AGENTS:
        use_agent(model, agent)
        # Build the optimizer from whatever requires grad: that checks the freezing, not just our list.
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model, agent)}
        lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        optimizer = torch.optim.Adam(trainable, lr=1e-2)  # no weight decay: a change means a real gradient
        for _ in range(3):
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # a LoRA-only language-model loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for n, p in model.named_parameters():
            if "lora_" in n:
                changed = not torch.equal(p, lora_before[n])
                assert changed == (f".{agent}." in n), n  # this agent's A and B all moved, the other's did not
    assert parameter_hashes(model, lambda n: "lora_" not in n) == base_before


# ----------------------------------------------------------------------------- saving and loading

def trained_looking_agents(path, seed):
    """Tiny agents with random LoRA B (distinct per agent), a chat batch, and each agent's logits on it."""
    model, tokenizer = tiny_agents(path)
    perturb_lora_b(model, "conversation", seed=seed)
    perturb_lora_b(model, "feedback", seed=seed + 1)
    ids = chat_batch(tokenizer)
    expected = {}
    for agent in AGENTS:
        use_agent(model, agent)
        expected[agent] = logits_of(model, ids)
    return model, ids, expected


def test_save_and_load_agents_round_trip(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ids, expected = trained_looking_agents(tiny_model_dir, seed=1)
    folder = tmp_path / "agents"
    save_agents(model, folder)
    for agent in AGENTS:
        assert (folder / agent / "adapter_config.json").exists()
        assert (folder / agent / "adapter_model.safetensors").exists()

    fresh_base, _ = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    loaded = load_agents(fresh_base, folder)
    for agent in AGENTS:
        use_agent(loaded, agent)
        assert torch.equal(logits_of(loaded, ids), expected[agent]), agent
        assert all(p.requires_grad for p in adapter_parameters(loaded, agent))  # trainable=True: resumable
    with reference_policy(loaded):
        assert max_diff(logits_of(loaded, ids), expected["feedback"]) > 1e-3

    # The folder is plain peft: no nanowaltz code needed to use the trained feedback agent.
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder / "feedback")
    torch.testing.assert_close(logits_of(plain, ids), expected["feedback"], rtol=0, atol=1e-6)


def test_saving_adapters_asks_the_hub_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """peft's default decides whether to save the embeddings by fetching the base model's config from the hub: a
    network request per save, and a warning at every checkpoint when offline. We never train the embeddings."""
    import warnings

    import peft.utils.save_and_load

    asked = []
    def no_hub(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return None
    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, _, _ = trained_looking_agents(tiny_model_dir, seed=1)
    for agent in AGENTS:  # as for a model loaded by hub id
        model.peft_config[agent].base_model_name_or_path = "org/unreachable-model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_agents(model, tmp_path / "agents")
    assert asked == []
    assert not [w for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
    for agent in AGENTS:
        assert (tmp_path / "agents" / agent / "adapter_model.safetensors").exists()


def test_saved_adapters_are_portable_plain_peft_with_model_cards(tiny_model_dir, tmp_path):
    """What a user elsewhere does with the saved folders: read base_model_name_or_path, load that base with plain
    transformers, put each adapter on it with plain peft, and get exactly nanowaltz's logits. The cards say what it is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ids, expected = trained_looking_agents(tiny_model_dir, seed=3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model": tiny_model_dir, "lora_rank": 16, "stage2_lam": 0.5}))
    save_agents(model, run / "adapters", eval_text="| system | ASR |\n|---|---:|\n| waltzrl | 12.5 |")

    for agent in AGENTS:
        config = json.loads((run / "adapters" / agent / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == tiny_model_dir  # a local base stays its path
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        plain = PeftModel.from_pretrained(base, run / "adapters" / agent)
        torch.testing.assert_close(logits_of(plain, ids), expected[agent], rtol=0, atol=1e-6)
        card = (run / "adapters" / agent / "README.md").read_text()
        assert f"base_model: {tiny_model_dir}" in card and f"# nanowaltz {agent} agent" in card
        assert "More Information Needed" not in card  # not peft's empty template
        assert '"stage2_lam": 0.5' in card  # the run's args.json, found beside the folder
        assert "| waltzrl | 12.5 |" in card and "de-quantised" not in card
    assert "conversation/" in (run / "adapters" / "README.md").read_text()

    updated = add_evaluation(run / "adapters", "| system | ASR |\n|---|---:|\n| waltzrl | 3.0 |")
    assert len(updated) == 2
    card = (run / "adapters" / "feedback" / "README.md").read_text()
    assert "| waltzrl | 3.0 |" in card and "12.5" not in card and '"stage2_lam": 0.5' in card


def test_the_default_model_is_saved_under_its_upstream_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOWALTZ_CACHE", str(tmp_path))
    converted = SimpleNamespace(get_base_model=lambda: SimpleNamespace(name_or_path=str(
        tmp_path / "smollm2-135m-instruct-0123456789")))
    elsewhere = SimpleNamespace(get_base_model=lambda: SimpleNamespace(name_or_path="org/some-model"))
    assert base_model_id(converted) == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert is_converted_default(converted) and not is_converted_default(elsewhere)
    assert base_model_id(elsewhere) == "org/some-model"
    card = adapter_card("feedback", DEFAULT_MODEL_HUB_ID, {"r": 16, "lora_alpha": 32}, "the Q4_1 GGUF", None, "")
    assert "de-quantised from the Q4_1 GGUF" in card and "Not recorded" in card and "Not evaluated yet" in card


def test_the_default_models_conversion_is_found_again_after_a_reinstall(tmp_path, monkeypatch):
    """A new .venv installs the same GGUF with a new mtime; its conversion (540 MB) must be found, not made again."""
    from nanowaltz.base_model import converted_folder

    monkeypatch.setenv("NANOWALTZ_CACHE", str(tmp_path / "cache"))
    first, reinstalled, other_version = (tmp_path / name / "model.gguf" for name in ("venv1", "venv2", "venv3"))
    for path, content in ((first, b"GGUF weights"), (reinstalled, b"GGUF weights"), (other_version, b"GGUF other")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(reinstalled, (1_000_000, 1_000_000))  # installed at another time
    assert converted_folder(first) == converted_folder(reinstalled)
    assert converted_folder(first) != converted_folder(other_version)
    assert converted_folder(first).parent == tmp_path / "cache"
    assert converted_folder(first).name.startswith("smollm2-135m-instruct-")  # what is_converted_default looks for


def test_load_agents_rejects_a_folder_without_adapters(tiny_model_dir, tmp_path):
    base, _ = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    with pytest.raises(SystemExit, match="conversation is not a saved adapter"):
        load_agents(base, tmp_path)


# ----------------------------------------------------------------------------- load_base errors

def test_load_base_missing_local_path_names_the_model(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit) as err:
        load_base(missing, load_in_4bit=False, device="cpu")
    assert missing in str(err.value) and "does not exist" in str(err.value)


def test_load_base_unknown_hub_id_names_the_model():
    # conftest sets HF_HUB_OFFLINE, so this fails at once instead of waiting for the network.
    with pytest.raises(SystemExit, match="nobody-here/no-such-model"):
        load_base("nobody-here/no-such-model", load_in_4bit=False, device="cpu")


def test_load_base_without_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config_file = plain / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="has no chat template"):
        load_base(str(plain), load_in_4bit=False, device="cpu")


# ----------------------------------------------------------------------------- 4-bit (QLoRA) on CPU

def linear4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def lora_logprob_loss(model, context, action):
    """Minus the summed log-prob of `action` after `context`: the shape of the PPO loss, enough for gradients."""
    device = next(model.parameters()).device
    ids = torch.tensor([context + action], device=device)
    logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, torch.tensor(action, device=device)[:, None]).sum()


def assert_agent_grads_ok(model, agent):
    names = {id(p): n for n, p in model.named_parameters()}
    for p in adapter_parameters(model, agent):
        assert p.grad is not None, f"{names[id(p)]}: no gradient"
        assert torch.isfinite(p.grad).all(), names[id(p)]
        assert p.grad.abs().sum() > 0, f"{names[id(p)]}: zero gradient"


def test_4bit_lora_gets_gradients_after_a_no_grad_generation(tiny_model_dir, device):
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=True, device=device)
    layers = linear4bit_layers(base)
    assert len(layers) == TINY_LAYERS * N_LINEAR_PER_LAYER
    assert disable_bnb_cpu_repack(base) == len(layers) > 0
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    model = attach_agents(base)
    perturb_lora_b(model, "feedback", seed=3)  # B != 0, so that A gets a gradient too

    # What the rollout does: eval mode, no grad. This is when bnb would repack weights on an AVX512-BF16 CPU.
    model.eval()
    use_agent(model, "feedback")
    context = rollout.chat_ids(tokenizer, [{"role": "user", "content": "What is SQL injection?"}])
    actions, logprobs, _ = rollout.sample(model, tokenizer, [context], max_new_tokens=6)
    assert len(actions[0]) >= 1 and all(lp <= 0 for lp in logprobs[0])
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)

    model.train()
    lora_logprob_loss(model, context, actions[0]).backward()
    assert_agent_grads_ok(model, "feedback")
    assert all(p.grad is None for p in adapter_parameters(model, "conversation"))


def test_4bit_cpu_repack_trap_without_the_fix(tmp_path):
    """Why disable_bnb_cpu_repack exists: with bnb's AVX512-BF16 fast path on, one no-grad eval forward repacks the
    4-bit weights into an inference-only layout, and training through them afterwards breaks the LoRA gradients."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never takes the repacking fast path (no trap here)")
    # 64 wide, not the usual 32: bitsandbytes 0.50.2 cannot repack a layer narrower than one 64-value quantization
    # block (the forward fails outright), and the trap to show is the silent one of real models.
    model_dir = build_tiny_model_dir(tmp_path, hidden_size=64)

    def feedback_grads(enable_fast_path):
        base, tokenizer = load_base(model_dir, load_in_4bit=True, device="cpu")
        model = attach_agents(base)
        perturb_lora_b(model, "feedback", seed=3)
        for layer in linear4bit_layers(model):
            layer.support_avx512bf16_for_cpu = enable_fast_path
        use_agent(model, "feedback")
        context = rollout.chat_ids(tokenizer, [{"role": "user", "content": "What is SQL injection?"}])
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.tensor([context]))
        repacked = any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                       for layer in linear4bit_layers(model))
        model.train()
        try:
            lora_logprob_loss(model, context, [5, 6, 7, 8]).backward()
        except RuntimeError:
            return repacked, None
        return repacked, [p.grad for p in adapter_parameters(model, "feedback")]

    fixed_repacked, fixed = feedback_grads(enable_fast_path=False)
    trap_repacked, trapped = feedback_grads(enable_fast_path=True)
    assert not fixed_repacked and all(g is not None for g in fixed)
    assert trap_repacked
    # The trap shows as a failed backward, missing gradients, or gradients that no longer match the exact path
    # (the base matmul's backward is gone, so gradient stops flowing through the frozen weights).
    if trapped is not None and all(g is not None for g in trapped):
        flat_fixed = torch.cat([g.flatten() for g in fixed])
        flat_trapped = torch.cat([g.flatten() for g in trapped])
        assert torch.nn.functional.cosine_similarity(flat_fixed, flat_trapped, dim=0) < 0.99


def _stderr_of(code):
    """Run `code` in a fresh interpreter (offline hub) and return what it printed on stderr; it must not fail."""
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stderr


def test_the_hub_kernel_messages_are_dropped_and_nothing_else():
    """models.py drops exactly the two messages bitsandbytes and `kernels` log about the hub kernel of the fast path
    we turn off, by their text, and keeps every other message of those loggers. The messages are logged here, in a
    fresh interpreter, with the wording bitsandbytes 0.50 and kernels 0.19 use: whether bitsandbytes itself logs
    them depends on the CPU and on the hub cache (the next test covers that path where it happens)."""
    quiet = _stderr_of(
        "import nanowaltz.models, logging\n"
        "ops, hub = logging.getLogger('bitsandbytes.backends.cpu.ops'), logging.getLogger('kernels._internals.hf_hub')\n"
        "ops.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1', 'offline')\n"
        "hub.warning(\"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
        "Hugging Face Hub is in offline mode.\")\n"
        "ops.warning('kept: ops'); hub.warning('kept: hub')\n")
    assert "gemm_4bit_forward" not in quiet and "quantization-bitsandbytes" not in quiet, quiet
    assert "kept: ops" in quiet and "kept: hub" in quiet, quiet


def test_no_warning_about_the_hub_kernel_of_the_fast_path_we_turn_off():
    """On a CPU with AVX512-BF16, importing bitsandbytes (peft does) may warn that it could not fetch a hub kernel for
    the repacking fast path that disable_bnb_cpu_repack turns off. With models.py imported first, the import is
    quiet. Where bare `import peft` does not warn (the kernel found in a cache, another bitsandbytes), this checks only
    that the import works; the test above checks the filter itself."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not look for the fast-path kernel")
    noisy = _stderr_of("import peft")
    quiet = _stderr_of("import nanowaltz.models, peft")
    assert "gemm_4bit_forward" not in quiet and "quantization-bitsandbytes" not in quiet, quiet
    if "gemm_4bit_forward" not in noisy:
        pytest.skip(f"bare `import peft` logged no hub-kernel warning here (stderr: {noisy[-300:]!r})")


# ----------------------------------------------------------------------------- the embedded default model

@pytest.mark.slow
def test_default_model_agents_answer_coherently():
    model, tokenizer = load_agents_or_fresh(DEFAULT_MODEL, load_in_4bit=False, device="cpu")
    context = rollout.chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    for agent in AGENTS:
        use_agent(model, agent)
        actions, _, _ = rollout.sample(model, tokenizer, [context], max_new_tokens=24, temperature=0)
        answer = tokenizer.decode(actions[0], skip_special_tokens=True).strip()
        words = answer.split()
        assert words, f"{agent}: empty answer"
        assert sum(w.isascii() and any(c.isalpha() for c in w) for w in words) >= 0.8 * len(words), answer
        assert "Paris" in answer, f"{agent}: {answer!r}"
    assert base_model_id(model) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # what saved adapters will name as base


def test_wrapping_the_agents_prints_no_library_deprecation_warning(tiny_model_dir, tmp_path):
    """peft touches transformers' deprecated `is_gradient_checkpointing` while wrapping; that FutureWarning reaches
    every user of train.py/eval.py/infer.py unless models.py silences it (creating and loading adapters)."""
    import warnings

    from nanowaltz.base_model import load_base
    from nanowaltz.models import attach_agents, load_agents, save_agents

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_agents(load_base(tiny_model_dir, load_in_4bit=False)[0])
        save_agents(model, tmp_path / "adapters")
        load_agents(load_base(tiny_model_dir, load_in_4bit=False)[0], tmp_path / "adapters")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.slow
def test_converting_the_default_model_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    """A first run converts the GGUF in-process; the same seed must then draw what it draws in every later run."""
    from nanowaltz.base_model import default_model_path

    monkeypatch.setenv("NANOWALTZ_CACHE", str(tmp_path))  # an empty cache: this call converts
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    path = default_model_path()
    assert (Path(path) / "config.json").exists() and Path(path).parent == tmp_path
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)

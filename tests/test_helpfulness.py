"""bench/helpfulness.py: reference NLL vs a naive forward, zero-init adapters = base exactly, CLI and file errors."""
import json

import pytest
import torch

from bench.helpfulness import agent_context, main, read_references, reference_nll
from nanowaltz.base_model import load_base
from nanowaltz.models import attach_agents, reference_policy, save_agents, use_agent
from rollout import CONVERSATION_SYSTEM_PROMPT

ROWS = [{"id": "a", "prompt": "How do I kill a Python process?", "reference": "Use kill with the process id."},
        {"id": "b", "prompt": "What is SQL injection?",
         "reference": "An attack that puts SQL into a query. Defend with parameters."}]


@pytest.fixture
def tiny(tiny_model_dir):
    base, tokenizer = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    return attach_agents(base), tokenizer


def perturb_conversation_adapter(model, seed=0):
    """Give the conversation adapter a nonzero update (LoRA B starts at 0), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".conversation." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_zero_init_adapter_gives_exactly_the_base_nll_and_a_trained_one_does_not(tiny):
    model, tokenizer = tiny
    with reference_policy(model):
        base = reference_nll(model, tokenizer, ROWS)
    use_agent(model, "conversation")
    assert reference_nll(model, tokenizer, ROWS) == base  # exact: a zero LoRA update adds exactly 0.0
    perturb_conversation_adapter(model)
    trained = reference_nll(model, tokenizer, ROWS)
    assert [n for _, n in trained] == [n for _, n in base]
    assert all(abs(t - b) > 1e-3 for (t, _), (b, _) in zip(trained, base))
    with reference_policy(model):  # and the base is still the base with a trained adapter attached
        assert reference_nll(model, tokenizer, ROWS) == base


def test_nll_equals_a_naive_forward_over_system_prompt_prompt_and_reference(tiny):
    model, tokenizer = tiny
    perturb_conversation_adapter(model, seed=1)
    use_agent(model, "conversation")
    scores = reference_nll(model, tokenizer, ROWS, batch_size=2)  # one batch: shared prefix and right padding
    for row, (nll, n_tokens) in zip(ROWS, scores):
        context = agent_context(tokenizer, row["prompt"])
        assert CONVERSATION_SYSTEM_PROMPT in tokenizer.decode(context) and row["prompt"] in tokenizer.decode(context)
        answer = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([context + answer])).logits[0].double().log_softmax(-1)
        # position i predicts token i + 1: answer token t sits at len(context) + t
        expected = -sum(logp[len(context) + t - 1, token].item() for t, token in enumerate(answer))
        assert n_tokens == len(answer)
        assert nll == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_cli_names_a_missing_adapters_folder_and_missing_adapters(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match=r"--adapters \S*nope: folder not found"):
        main(["--adapters", str(tmp_path / "nope"), "--model", tiny_model_dir])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no saved adapter for \['conversation', 'feedback'\]"):
        main(["--adapters", str(tmp_path / "empty"), "--model", tiny_model_dir])


def test_cli_with_untrained_adapters_reports_zero_delta_and_writes_every_answer(tmp_path, tiny_model_dir, capsys):
    base, _ = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    save_agents(attach_agents(base), tmp_path / "adapters")
    out = tmp_path / "helpfulness.json"
    assert main(["--adapters", str(tmp_path / "adapters"), "--model", tiny_model_dir, "--limit", "3",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n_prompts"] == 3 and len(summary["prompts"]) == 3
    assert summary["delta_nll_per_token"] == 0.0 and summary["base"] == summary["trained"]
    assert [p["answer_base"] for p in summary["prompts"]] == [p["answer_trained"] for p in summary["prompts"]]
    assert summary["prompts"][0]["id"] == "hr-001" and summary["base"]["nll_per_token"] > 0
    assert "delta NLL/token (trained - base): +0.000" in capsys.readouterr().out


def test_reference_file_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text('{"id": "a", "prompt": "hi", "reference": "Hello there."}\n{"id": "b", "prompt": "hi"}\n')
    with pytest.raises(SystemExit, match=r"refs.jsonl, line 2: needs a JSON object with a non-empty string field "
                                         r"'reference'"):
        read_references(path)
    path.write_text('{"id": "a", "prompt": "hi", "reference": "Hello."}\n\n[1, 2]\n')
    with pytest.raises(SystemExit, match=r"line 3: needs a JSON object with a non-empty string field 'id'"):
        read_references(path)
    rows = read_references("data/helpful_references.jsonl")
    assert len(rows) >= 40 and len({r["id"] for r in rows}) == len(rows)
    assert all(40 <= len(r["reference"].split()) <= 80 for r in rows)

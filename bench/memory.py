"""Memory of the one-GPU recipe, measured per layer on the CPU at Llama-3.1-8B-Instruct's real shapes, and README's
24 GB budget rebuilt from the measurements.

    python bench/memory.py            # ~30 min on 2 cores; writes bench/memory_measured.json, prints the budget
    python bench/memory.py --budget   # the budget again from bench/memory_measured.json (no measuring)

What is measured. A randomly initialised LlamaForCausalLM with the real shapes (hidden 4096, MLP 14336, 32 query and 8
key/value heads of 128, vocabulary 128256), with two and with three decoder layers instead of 32 (from the second
layer on every layer adds the same; the first differs, since its input is the embeddings' output, which stays alive),
loaded as train.py loads the base (NF4 4-bit through bitsandbytes, bf16 compute,
nanowaltz.base_model.from_pretrained_kwargs) with the two LoRA adapters (r = 16 on every linear layer, fp32,
nanowaltz.models.attach_agents). Each phase runs as the project runs it, at two token counts:
  prefill    a no-grad forward through the decoder of left-padded rows with a KV cache, as nanowaltz/sampler.py runs
             it, with the conversation adapter (the policy) and with the adapters off (the judge: no LoRA)
  decode     one more token per row on top of that cache
  update     a forward and backward of the decoder in training mode, with and without gradient checkpointing, as
             logprobs.action_logprobs runs it
  fixed      the fused log-prob kernel (logprobs.token_logprobs over the real lm_head: one chunk of logits), the
             sampler's last-position logits, and the bytes of the weights, adapters and KV cache tensors
How: the peak resident memory of this process over the phase (Linux VmHWM, reset through /proc/self/clear_refs before
each phase, its baseline the resident memory just before), with glibc told to serve every allocation above 64 KB from
mmap, so that a freed tensor leaves the resident set at once. Each phase's peak is fitted exactly as fixed + per layer
+ (per token + per layer and token) x tokens; the token counts are large enough that activations, not the transient
de-quantised weights, set every peak.

One CPU effect is kept out, because a GPU does not have it: the lm_head of the sampler's sliced last position copies
its 1 GB weight once per row on a CPU (a batched matmul over a broadcast weight), so the last-position logits are
measured on a contiguous hidden state. The weight bitsandbytes de-quantises for each matmul of several rows (bf16, up
to 117 MB, on a GPU too) is in the fixed terms.

The budget. Those figures at the recipe's real sequence lengths (README "On a GPU with a real model"), padding
included: every row of a rollout batch is as long as its longest row, the longest contexts are counted with the
embedded SmolLM2 tokenizer (Llama-3.1's is not available offline; SmolLM2's splits English into slightly more tokens,
so it errs on the long side), and the judge (WildGuard, a Mistral-7B with the same decoder layers as Llama-3.1-8B,
vocabulary 32768) in NF4 on the same GPU. Marked "measured per layer on CPU, extrapolated": a GPU's kernels allocate
differently from the CPU's, the CUDA context and the allocator's slack are not measured here, and bench/gpu_check.py
measures the real thing on a GPU.
"""
import argparse
import ctypes
import dataclasses
import gc
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# Run as `python bench/memory.py`, sys.path[0] is bench/, where bench/rollout.py would shadow the project's.
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = os.path.join(HERE, "memory_measured.json")
GB, KB = 1e9, 1024
# Llama-3.1-8B-Instruct's config.json, and allenai/wildguard's (a Mistral-7B-v0.3: the same decoder layers).
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5)
WILDGUARD_LAYERS, WILDGUARD_VOCAB = 32, 32768
LORA_RANK, LORA_ALPHA = 16, 32
LOGPROB_CHUNK = 1024  # train.py's --logprob-chunk-size
LOGITS_ROWS = {"rollout_rows": 32, "judge_rows": 16}  # rows of the last-position logits measured (scaled per row)
JUDGE_NEW_TOKENS = 48  # HFJudge's max_new_tokens
CARD_GB = 24 * 2 ** 30 / GB  # a "24 GB" card (RTX 3090/4090) holds 24 GiB = 25.8 GB
MARGIN = 0.10  # the budget must leave this share of the card free


# ---------------------------------------------------------------------------------------------------------------------
# Peak resident memory of a phase
# ---------------------------------------------------------------------------------------------------------------------
def serve_large_allocations_from_mmap(threshold: int = 64 * KB) -> None:
    """glibc: allocations above `threshold` come from mmap and go back to the system when freed (M_MMAP_THRESHOLD)."""
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-3, threshold) != 1:
        raise SystemExit("bench/memory.py: mallopt(M_MMAP_THRESHOLD) failed; this benchmark needs glibc on Linux")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * KB


def peak_over_baseline(fn):
    """(peak resident bytes above the resident bytes before `fn`, what `fn` returned)."""
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    result = fn()
    return _status("VmHWM") - baseline, result


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (a view counts once), with the 4-bit weights' quantisation state."""
    seen, total = set(), 0
    for t in tensors:
        state = getattr(t, "quant_state", None)
        extra = []
        if state is not None:
            extra = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
        for x in [t] + extra:
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# The model: real shapes, two or three decoder layers, as train.py loads it
# ---------------------------------------------------------------------------------------------------------------------
def save_random_model(folder: str, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)


def load_model(folder: str, layers: int):
    """The saved model cut to `layers` decoder layers, in NF4 with bf16 compute, with both LoRA adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from nanowaltz.base_model import disable_bnb_cpu_repack, from_pretrained_kwargs
    from nanowaltz.models import attach_agents

    base = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=layers,
                                                **from_pretrained_kwargs(True, torch.bfloat16, "cpu"))
    disable_bnb_cpu_repack(base)
    base.requires_grad_(False)
    return attach_agents(base, rank=LORA_RANK, alpha=LORA_ALPHA)


def padded_rows(rows: int, tokens: int, generator):
    """Token ids of `rows` rows padded to `tokens` columns, a quarter of each row but the first padding (as a batch of
    contexts of different lengths), and their attention mask."""
    import torch

    ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[1:, :tokens // 4] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------------------------------------
def prefill(model, ids, mask, adapters=True):
    """The sampler's prefill through the decoder: no grad, a KV cache, left padding. Returns the cache. The lm_head
    of the last positions is measured on its own (last_logits): on a CPU, the lm_head of a sliced hidden state copies
    its 1 GB weight once per row (a batched matmul over a broadcast weight), which a GPU does not."""
    import torch
    from transformers import DynamicCache

    from nanowaltz.base_model import cache_keyword

    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        if adapters:
            decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_keyword(decoder): cache})
        else:
            with model.disable_adapter():
                decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_keyword(decoder): cache})
    return cache


def last_logits(model, rows: int, generator):
    """The sampler's logits of one position per row and their fp32 log-softmax (nanowaltz/sampler.next_tokens)."""
    import torch

    hidden = torch.randn(rows, 1, LLAMA_31_8B["hidden_size"], generator=generator, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model.get_base_model().get_output_embeddings()(hidden)
        torch.log_softmax(logits.float(), dim=-1).exp()


def decode_step(model, cache, mask):
    import torch

    from nanowaltz.base_model import cache_keyword

    rows = mask.shape[0]
    step_mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        decoder(input_ids=torch.zeros(rows, 1, dtype=torch.long), attention_mask=step_mask,
                position_ids=mask.sum(-1, keepdim=True), use_cache=True, **{cache_keyword(decoder): cache})


def update_decoder(model, ids, mask, generator):
    """A training forward and backward of the decoder, as action_logprobs runs it (without the lm_head: the fused
    kernel is measured on its own); the gradient into the last hidden state is random."""
    import torch

    model.train()
    decoder = model.get_base_model().get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    (hidden * torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype)).sum().backward()
    model.zero_grad(set_to_none=True)


def fused_kernel(weight, tokens: int, chunk: int, generator):
    """logprobs.token_logprobs forward and backward over `tokens` action tokens with the real lm_head."""
    import torch

    from nanowaltz.logprobs import token_logprobs

    hidden = torch.randn(tokens, weight.shape[1], generator=generator, dtype=torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, weight.shape[0], (tokens,), generator=generator)
    logp, entropy = token_logprobs(hidden, weight, targets, 1.0, chunk_size=chunk, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()


PHASES = ("prefill", "prefill_judge", "decode", "update_plain", "update_checkpointing")
LAYERS = (2, 3)  # from the second layer on, every layer adds the same; the first also holds the embeddings' output
PREFILL_ROWS, PREFILL_LENGTHS = 4, (512, 1024)  # 2048 and 4096 tokens: activations, not weights, set the peak
UPDATE_TOKENS = (1024, 2048)  # one row


def measure(folder: str, log=print) -> dict:
    """Every phase's peak bytes at LAYERS x two token counts ({phase: {"layers,tokens": bytes}}), the tensor bytes of
    the weights and of one adapter per layer count, the KV cache's bytes, the fused kernel's peak at two token counts
    and the sampler's last-position logits at the rollout's and the judge's rows. Each model first runs every phase
    once on 256 tokens, and the prefill once more at each size, before measuring (warm-up)."""
    import torch

    from nanowaltz.base_model import enable_activation_checkpointing
    from nanowaltz.models import adapter_parameters, use_agent

    generator = torch.Generator().manual_seed(0)
    found = {name: {} for name in PHASES + ("kv_cache", "weights", "adapter", "fused_kernel", "last_logits")}

    def update(ids, mask, checkpointing):
        if checkpointing:
            enable_activation_checkpointing(base)
        try:
            return peak_over_baseline(lambda: update_decoder(model, ids, mask, generator))[0]
        finally:
            base.activation_checkpointing_disable()

    for layers in LAYERS:
        began = time.perf_counter()
        model = load_model(folder, layers)
        base = model.get_base_model()
        found["weights"][layers] = tensor_bytes(list(base.parameters()) + list(base.buffers())) - tensor_bytes(
            [p for n, p in base.named_parameters() if "lora_" in n])
        found["adapter"][layers] = tensor_bytes(adapter_parameters(model, "conversation"))
        use_agent(model, "conversation")
        ids, mask = padded_rows(1, 256, generator)  # warm-up
        model.eval()
        decode_step(model, prefill(model, ids, mask), mask)
        prefill(model, ids, mask, adapters=False)
        update(ids, mask, False), update(ids, mask, True)
        for length in PREFILL_LENGTHS:
            ids, mask = padded_rows(PREFILL_ROWS, length, generator)
            key = f"{layers},{ids.numel()}"
            model.eval()
            decode_step(model, prefill(model, ids, mask, adapters=False), mask)  # warm-up at this size too (cheap)
            found["prefill_judge"][key], _ = peak_over_baseline(lambda: prefill(model, ids, mask, adapters=False))
            found["prefill"][key], cache = peak_over_baseline(lambda: prefill(model, ids, mask))
            found["kv_cache"][key] = tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
            found["decode"][key], _ = peak_over_baseline(lambda: decode_step(model, cache, mask))
            cache = None
        for tokens in UPDATE_TOKENS:
            ids, mask = padded_rows(1, tokens, generator)
            key = f"{layers},{tokens}"
            found["update_plain"][key], found["update_checkpointing"][key] = update(ids, mask, False), update(
                ids, mask, True)
        log(f"  {layers} layers: " + "; ".join(
            f"{phase} " + ", ".join(f"{int(k.split(',')[1])} tokens {v / 1e6:.0f} MB" for k, v in found[phase].items()
                                    if int(k.split(",")[0]) == layers) for phase in PHASES)
            + f" ({time.perf_counter() - began:.0f} s)", flush=True)
        if layers == LAYERS[0]:
            weight = base.get_output_embeddings().weight
            fused_kernel(weight, 1024, LOGPROB_CHUNK, generator)  # warm-up
            for tokens in (2048, 4096):
                found["fused_kernel"][tokens], _ = peak_over_baseline(
                    lambda: fused_kernel(weight, tokens, LOGPROB_CHUNK, generator))
            for what in ("rollout_rows", "judge_rows"):
                last_logits(model, LOGITS_ROWS[what], generator)
                found["last_logits"][what], _ = peak_over_baseline(
                    lambda: last_logits(model, LOGITS_ROWS[what], generator))
            log(f"  fused kernel: {found['fused_kernel'][2048] / 1e6:.0f} MB at 2048 action tokens, "
                f"{found['fused_kernel'][4096] / 1e6:.0f} MB at 4096; last-position logits: "
                f"{found['last_logits']['rollout_rows'] / 1e6:.0f} MB for {LOGITS_ROWS['rollout_rows']} rows",
                flush=True)
        model = base = None
        gc.collect()
    return found


def fit(points: dict) -> dict:
    """{"layers,tokens": bytes} at two layer counts x two token counts -> the exact solution of
    bytes = fixed + per_layer * L + (per_token + per_layer_token * L) * tokens."""
    (l1, l2), (n1, n2) = (sorted({int(k.split(",")[i]) for k in points}) for i in (0, 1))
    at = lambda layers, tokens: points[f"{layers},{tokens}"]  # noqa: E731
    slope = {L: (at(L, n2) - at(L, n1)) / (n2 - n1) for L in (l1, l2)}
    per_layer_token = (slope[l2] - slope[l1]) / (l2 - l1)
    intercept = {L: at(L, n1) - slope[L] * n1 for L in (l1, l2)}
    per_layer = (intercept[l2] - intercept[l1]) / (l2 - l1)
    return {"fixed": intercept[l1] - per_layer * l1, "per_layer": per_layer,
            "per_token": slope[l1] - per_layer_token * l1, "per_layer_token": per_layer_token}


def at(coefficients: dict, layers: int, tokens: int) -> float:
    c = coefficients
    return c["fixed"] + c["per_layer"] * layers + (c["per_token"] + c["per_layer_token"] * layers) * tokens


# ---------------------------------------------------------------------------------------------------------------------
# The budget at the recipe's lengths
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Lengths:
    revision_context: int  # the longest context of a revision turn (system prompt, prompt, answer, feedback)
    revision_new: int  # its new tokens (--conversation-max-new-tokens)
    judge_input: int | None  # the longest judge input (WildGuard's format around a prompt and an answer)


def readme_recipe() -> dict:
    """What the budget needs of README's one-GPU command (bench/gpu_check.readme_train_flags reads it)."""
    import train
    from bench.gpu_check import readme_train_flags

    args = train.parse_args(readme_train_flags())
    return {"rollout_rows": args.rollout_batch_size, "micro_rows": args.micro_batch_size,
            "judge_rows": args.judge_batch_size or 16, "conversation_max_new_tokens": args.conversation_max_new_tokens,
            "feedback_max_new_tokens": args.feedback_max_new_tokens}


def recipe_lengths(recipe: dict) -> Lengths:
    """The recipe's longest sequences, counted with the embedded SmolLM2 tokenizer on the training prompts."""
    from transformers import AutoTokenizer

    from nanowaltz.base_model import default_model_path
    from nanowaltz.data import load_prompts
    from nanowaltz.judge import wildguard_input
    from rollout import RolloutConfig, longest_contexts

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = RolloutConfig(conversation_max_new_tokens=recipe["conversation_max_new_tokens"],
                           feedback_max_new_tokens=recipe["feedback_max_new_tokens"])
    prompts = [p["prompt"] for p in load_prompts(os.path.join(REPO, "data", "prompts.jsonl"), split="train")]
    longest = max(longest_contexts(tokenizer, prompts, config))
    judge = max(len(tokenizer(wildguard_input(p, ""), add_special_tokens=False)["input_ids"]) for p in prompts)
    new = recipe["conversation_max_new_tokens"]
    return Lengths(revision_context=longest - new, revision_new=new, judge_input=judge + new)


def budget(measured: dict, lengths: Lengths, recipe: dict) -> dict:
    """The 24 GB budget rows in GB, from the measured figures at these lengths and the recipe's rows (padding
    included: every row of a batch as long as the longest)."""
    layers = LLAMA_31_8B["num_hidden_layers"]
    rows, micro_rows, judge_rows = recipe["rollout_rows"], recipe["micro_rows"], recipe["judge_rows"]
    fits = {phase: fit(measured[phase]) for phase in PHASES}
    (l1, w1), (l2, w2) = sorted((int(k), v) for k, v in measured["weights"].items())
    per_layer_weights = (w2 - w1) / (l2 - l1)
    vocab_weights = w1 - l1 * per_layer_weights  # embeddings, lm_head, final norm
    adapter = measured["adapter"][str(l2)] / l2
    kv_key = max(measured["kv_cache"], key=lambda k: int(k.split(",")[1]))
    kv_per_layer_token = measured["kv_cache"][kv_key] / (int(kv_key.split(",")[0]) * int(kv_key.split(",")[1]))
    kernel = measured["fused_kernel"]
    kernel_per_token = (kernel["4096"] - kernel["2048"]) / 2048
    kernel_fixed = kernel["2048"] - kernel_per_token * 2048
    logits_per_row = {what: measured["last_logits"][what] / n for what, n in LOGITS_ROWS.items()}

    context, new = lengths.revision_context, lengths.revision_new
    sequence = context + new
    rows_out = {
        "weights": layers * per_layer_weights + vocab_weights,
        "adapters": 2 * layers * adapter,
        "optimizer": 2 * 3 * layers * adapter,  # per agent: gradients + AdamW's two moments (both agents in stage 2)
        "judge_weights": WILDGUARD_LAYERS * per_layer_weights + vocab_weights * WILDGUARD_VOCAB / LLAMA_31_8B[
            "vocab_size"],
        # the longest turn (a revision): prefill of every row padded to the longest context, then the KV cache at
        # its longest plus one decoding step and the last-position logits
        "rollout_prefill": at(fits["prefill"], layers, rows * context),
        "rollout_decode": layers * kv_per_layer_token * rows * sequence + at(fits["decode"], layers, rows * sequence)
        + logits_per_row["rollout_rows"] * rows,
        "update_activations": at(fits["update_checkpointing"], layers, micro_rows * sequence)
        + kernel_fixed + kernel_per_token * micro_rows * new,
        "update_without_checkpointing": at(fits["update_plain"], layers, micro_rows * sequence)
        + kernel_fixed + kernel_per_token * micro_rows * new,
    }
    if lengths.judge_input is not None:
        judge_tokens = judge_rows * lengths.judge_input
        rows_out["judge_prefill"] = at(fits["prefill_judge"], WILDGUARD_LAYERS, judge_tokens)
        rows_out["judge_decode"] = (WILDGUARD_LAYERS * kv_per_layer_token * judge_rows
                                    * (lengths.judge_input + JUDGE_NEW_TOKENS)
                                    + at(fits["decode"], WILDGUARD_LAYERS, judge_tokens)
                                    + logits_per_row["judge_rows"] * judge_rows * WILDGUARD_VOCAB
                                    / LLAMA_31_8B["vocab_size"])
    result = {k: v / GB for k, v in rows_out.items()}
    resident = result["weights"] + result["adapters"] + result["optimizer"] + result["judge_weights"]
    result["rollout"] = resident + max(result["rollout_prefill"], result["rollout_decode"])
    result["judge"] = resident + max(result.get("judge_prefill", 0.0), result.get("judge_decode", 0.0))
    result["update"] = resident + result["update_activations"]
    result["peak"] = max(result["rollout"], result["judge"], result["update"])
    return result


CUDA_CONTEXT_GB = 1.0  # not measurable on a CPU: what a CUDA context typically takes, counted against the card


def budget_lines(result: dict, lengths: Lengths, recipe: dict, measured: dict) -> list:
    """The budget as the lines docs/gpu.md shows (tests/test_gpu_check.py checks that the page has them)."""
    card = CARD_GB * (1 - MARGIN)
    total = result["peak"] + CUDA_CONTEXT_GB
    names = {"weights": "base weights: NF4 linear layers + bf16 embeddings and lm_head",
             "adapters": "two LoRA adapters (r = 16, fp32)", "optimizer": "their gradients + AdamW moments (stage 2)",
             "judge_weights": "judge: WildGuard (Mistral-7B), NF4 (`--judge-4bit`)",
             "rollout_prefill": f"rollout: prefill of the longest turn, {recipe['rollout_rows']} rows",
             "rollout_decode": "rollout: KV cache at its longest + a decoding step",
             "judge_prefill": f"judge: prefill, {recipe['judge_rows']} rows",
             "judge_decode": "judge: KV cache + a decoding step",
             "update_activations": f"update, micro-batch {recipe['micro_rows']}, gradient checkpointing (+ fused "
                                   f"kernel)",
             "update_without_checkpointing": "the same update without gradient checkpointing (not used)"}
    lines = [f"| {name} | {result[key]:.2f} GB |" for key, name in names.items() if key in result]
    lines += [f"| **peak during the {key}** (the resident rows above + its own) | **{result[key]:.2f} GB** |"
              for key in ("rollout", "judge", "update")]
    lines.append(f"| peak + CUDA context (~{CUDA_CONTEXT_GB:.0f} GB, not measured) against a 24 GB card less "
                 f"{MARGIN:.0%} ({card:.1f} GB) | {total:.1f} GB: {'fits' if total <= card else 'DOES NOT FIT'} |")
    return lines


def print_budget(result: dict, lengths: Lengths, recipe: dict, measured: dict) -> None:
    print(f"\nBudget of README's one-GPU command (measured per layer on CPU, extrapolated to 32 layers; "
          f"{measured['machine']})")
    print(f"lengths: revision context {lengths.revision_context} + {lengths.revision_new} new tokens; judge input "
          f"{lengths.judge_input} + {JUDGE_NEW_TOKENS} new tokens")
    print("\n".join(budget_lines(result, lengths, recipe, measured)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", action="store_true", help=f"print the budget from {RESULTS} without measuring")
    parser.add_argument("--workdir", default=None, help="where the random 3-layer model (3.4 GB) goes (default: a "
                                                        "temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    if not args.budget:
        import shutil

        import torch

        from bench.machine import machine_info

        serve_large_allocations_from_mmap()
        print(machine_info(), flush=True)
        workdir = args.workdir or tempfile.mkdtemp(prefix="nanowaltz-memory-")
        try:
            config = os.path.join(workdir, "config.json")
            if not os.path.exists(config) or json.load(open(config))["num_hidden_layers"] < max(LAYERS):
                save_random_model(workdir, max(LAYERS))
            found = measure(workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        found["machine"] = f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
        with open(RESULTS, "w") as f:
            json.dump(found, f, indent=1)
        print(f"wrote {RESULTS}")
    with open(RESULTS) as f:
        measured = json.load(f)
    recipe = readme_recipe()
    lengths = recipe_lengths(recipe)
    if measured.get("lengths") != dataclasses.asdict(lengths):  # kept with the measurements: the budget's inputs
        measured["lengths"] = dataclasses.asdict(lengths)
        with open(RESULTS, "w") as f:
            json.dump(measured, f, indent=1)
    print_budget(budget(measured, lengths, recipe), lengths, recipe, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())

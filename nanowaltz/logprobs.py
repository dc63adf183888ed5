"""Per-token log-probabilities from hidden states without materialising the [tokens, vocab] logits.

Every policy-gradient step (docs/method.md, "Training": PPO clipped surrogate, per-token KL to the
reference policy) needs log pi(y_t | y_<t) for every response token, under the policy, the old
policy and the reference model. The textbook way is

    logits = hidden @ lm_head.T / temperature          # [tokens, vocab]
    logp   = log_softmax(logits).gather(-1, targets)

The memory argument. For 4096 tokens and Llama-3's 128256-token vocabulary the logits alone are
4096 * 128256 * 4 bytes = 2.1 GB in fp32. Autograd then keeps the log_softmax output (another
2.1 GB) and the backward pass builds a dense one-hot gradient and the softmax gradient (two more),
so the logits of one micro-batch cost 6-8 GB, far more than a LoRA-adapted 8B model's activations.
Yet each token only needs two numbers from its logit row: the target logit and the logsumexp.

The fix (the idea of Liger Kernel's fused linear cross-entropy and of Cut Cross-Entropy: Wijmans
et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009) is to
fuse the lm_head matmul with the softmax: walk over chunks of tokens and, inside each, over chunks
of the vocabulary, keep a running logsumexp (the flash-attention "online softmax" update) and
throw each logits block away as soon as it has been reduced. Only a [chunk, vocab_chunk] block
ever exists. Backward recomputes the blocks instead of storing them: with lse saved from the
forward pass, p = exp(logits / T - lse) is rebuilt block by block and

    d logp_i / d h_i = (W[y_i] - sum_v p_iv W_v) / T            (target row minus expected row)
    d logp_i / d W_v = (1[v = y_i] - p_iv) h_i / T

are accumulated per block. Liger and CCE write this as Triton kernels; here it is plain PyTorch
(a Python loop over blocks, matmuls in the inputs' dtype, logsumexp and softmax in fp32) so that
the whole thing reads in one sitting. The loop costs little because each block is a large matmul
doing the naive version's FLOPs, so nearly all the time is in the matmuls (docs/performance.md).
The entropy for logging comes out of the same online pass.

One addition of ours. Each output is a scalar per token, so its gradient w.r.t. h_i is
grad_out_i times a vector that does not depend on grad_out: (W[y_i] - E_p[W]) / T, an [H] vector.
When the lm_head is frozen (QLoRA, LoRA adapters: the case in this project) we accumulate that
vector in the same forward pass, at the price of one [tokens, hidden] buffer, and backward is one
multiply. That removes the recompute matmul: forward + backward does two vocab-sized matmuls,
like the naive version, instead of three. With a trainable (e.g. tied-embedding) lm_head the
weight gradient needs grad_out, so backward recomputes the logits as described above and
produces both gradients in that one pass; no [vocab, hidden] buffer is ever allocated for a
frozen weight. `hidden_grad_in_forward=False` forces the recompute path (tests, benchmark).

Simplifications: no lm_head bias (Llama has none); no double backward; masked positions
(targets == ignore_index) get log-prob 0, entropy 0 and zero gradient but still cost compute.

The end of the file applies the kernel to a causal LM: `action_logprobs(model, pad_batch(samples, ...))` gives the
log-probs of the sampled action tokens of training samples, running the system prompt they share only once.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from nanowaltz.base_model import cache_keyword
from nanowaltz.sampler import MIN_SHARED_PREFIX, common_prefix_length


def naive_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference: log_softmax(hidden @ weight.T / T) gathered at the targets (materialises all logits)."""
    logits = (hidden @ weight.T).float() / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # logsumexp in at least fp32 (bf16/fp16 logits would lose the small probabilities); fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _logits_block(hidden_chunk: Tensor, weight_chunk: Tensor, temperature: float) -> Tensor:
    """[tokens, vocab_chunk] tempered logits: matmul in the inputs' dtype, result in fp32 (or fp64)."""
    logits = (hidden_chunk @ weight_chunk.T).to(_compute_dtype(hidden_chunk.dtype))
    if temperature != 1.0:
        logits.div_(temperature)  # in place: the matmul output (or its fresh upcast) is ours to modify
    return logits


class _FusedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, vocab_chunk_size, ignore_index,
                want_entropy, hidden_grad_in_forward, needs_hidden_grad, needs_weight_grad):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        acc_dtype = _compute_dtype(hidden.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        # Every buffer is made on the inputs' device: a bare torch.empty would land on the default device (the CPU).
        on = dict(dtype=acc_dtype, device=hidden.device)
        target_logits = torch.empty(n_tokens, **on)
        lse = torch.empty(n_tokens, **on)
        entropy = torch.empty(n_tokens if want_entropy else 0, **on)
        # The frozen-weight shortcut: accumulate E_p[W] per token so backward needs no recompute.
        grad_in_forward = hidden_grad_in_forward and needs_hidden_grad and not needs_weight_grad
        hidden_grad = torch.empty_like(hidden) if grad_in_forward else None

        for start in range(0, n_tokens, chunk_size):
            h, y = hidden[start:start + chunk_size], safe_targets[start:start + chunk_size]
            run_target = torch.empty(h.shape[0], **on)
            run_lse = torch.full((h.shape[0],), float("-inf"), **on)
            run_plogp = torch.zeros(h.shape[0], **on)  # sum_v p_v log p_v, p normalised by run_lse
            run_pw = torch.zeros(h.shape[0], h.shape[1], **on) if grad_in_forward else None
            for v0 in range(0, vocab, vocab_chunk_size):
                w = weight[v0:v0 + vocab_chunk_size]
                logits = _logits_block(h, w, temperature)
                # Take the target logit from the very block that enters the lse, so logp <= 0 in any dtype.
                in_block = (y >= v0) & (y < v0 + w.shape[0])
                picked = logits.gather(1, (y - v0).clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
                run_target = torch.where(in_block, picked, run_target)
                # One exp per logit: u = exp(logit - block max), in place (the logits are not needed again).
                block_max = logits.amax(-1)
                unnormed = logits.sub_(block_max[:, None]).exp_()
                block_sum = unnormed.sum(-1)
                new_lse = torch.logaddexp(run_lse, block_max + block_sum.log())
                # Online softmax: earlier sums were normalised by the old lse, this block's by its max;
                # bring both to new_lse. carry <= 1 (0 on the first block); p = scale * u in this block.
                carry, log_carry = torch.exp(run_lse - new_lse), run_lse - new_lse
                scale, log_scale = torch.exp(block_max - new_lse), block_max - new_lse
                if want_entropy:
                    # log p = log u + log_scale, and renormalising p_old -> carry * p_old adds log_carry to
                    # every log p_old (sum p_old = 1). Summing p * logit instead would cancel badly.
                    carried = torch.where(carry > 0, carry * (run_plogp + log_carry), torch.zeros_like(carry))
                    block = scale * (torch.special.xlogy(unnormed, unnormed).sum(-1) + log_scale * block_sum)
                    run_plogp = carried + block
                if grad_in_forward:  # run_pw = sum_v p_v W_v so far
                    run_pw.mul_(carry[:, None]).add_((unnormed.to(hidden.dtype) @ w) * scale[:, None])
                run_lse = new_lse
                del logits, unnormed  # free this block before the next matmul allocates one: 1 block alive, not 2
            rows = slice(start, start + h.shape[0])
            lse[rows], target_logits[rows] = run_lse, run_target
            if want_entropy:
                entropy[rows] = -run_plogp
            if grad_in_forward:
                # d logp_i / d h_i = (W[y_i] - E_p[W]) / T, zero where masked; backward scales it by grad_out_i.
                direction = (weight[y].to(acc_dtype) - run_pw).div_(temperature)
                hidden_grad[rows] = direction.mul_(valid[rows, None].to(acc_dtype))

        logprobs = torch.where(valid, target_logits - lse, torch.zeros_like(lse))
        if want_entropy:
            entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
        ctx.mark_non_differentiable(entropy)
        ctx.grad_in_forward = grad_in_forward
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk_size = temperature, chunk_size, vocab_chunk_size
        if grad_in_forward:
            ctx.save_for_backward(hidden_grad)
        elif needs_hidden_grad or needs_weight_grad:
            ctx.save_for_backward(hidden, weight, safe_targets, valid, lse)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        if ctx.grad_in_forward:
            (hidden_grad,) = ctx.saved_tensors
            grad_hidden = (grad_logprobs[:, None] * hidden_grad).to(hidden_grad.dtype)  # product in fp32
            return grad_hidden, None, None, None, None, None, None, None, None, None, None
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size = ctx.temperature, ctx.chunk_size, ctx.vocab_chunk_size
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = _compute_dtype(hidden.dtype)
        # d loss / d logit_iv = g_i * (1[v = y_i] - p_iv) / T; masked tokens contribute nothing.
        g = torch.where(valid, grad_logprobs.to(acc_dtype), torch.zeros_like(lse)) / temperature
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Only a trainable weight gets a [vocab, hidden] buffer (fp32, so bf16 sums over chunks stay exact).
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None

        for start in range(0, hidden.shape[0], chunk_size):
            h, g_c, lse_c = (x[start:start + chunk_size] for x in (hidden, g, lse))
            y = targets[start:start + chunk_size]
            if want_hidden:  # the "1[v = y]" part: +g * W[y]
                gh = g_c[:, None] * weight[y].to(acc_dtype)
            if want_weight:
                grad_weight.index_add_(0, y, g_c[:, None] * h.to(acc_dtype))
            for v0 in range(0, weight.shape[0], vocab_chunk_size):
                w = weight[v0:v0 + vocab_chunk_size]
                # the "-p" part, p recomputed from the saved lse; d loss / d logits for this block:
                grad_logits = _logits_block(h, w, temperature).sub_(lse_c[:, None]).exp_().mul_(-g_c[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                # addmm_ accumulates in place (no [tokens, H] or [vocab_chunk, H] temporary) when dtypes agree.
                if want_hidden:
                    _accumulate_matmul(gh, grad_logits, w)
                if want_weight:
                    _accumulate_matmul(grad_weight[v0:v0 + vocab_chunk_size], grad_logits.T, h)
                del grad_logits
            if want_hidden:
                grad_hidden[start:start + chunk_size] = gh

        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _accumulate_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b; fp32/fp64 accumulators of bf16/fp16 products need the temporary."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, return_entropy: bool = False, ignore_index: int = -100,
                   vocab_chunk_size: int = 8192, hidden_grad_in_forward: bool = True):
    """log p(targets) under softmax(hidden @ weight.T / temperature), fused and chunked.

    hidden [..., H] (bf16/fp16/fp32/fp64), weight [V, H] same dtype, targets [...] int in [0, V) or
    ignore_index. Returns log-probs shaped like targets, fp32 (fp64 for fp64 inputs), 0 where ignored;
    with return_entropy also the per-token entropy of the tempered distribution (no gradient; logging).
    A chunk_size x vocab_chunk_size block of fp32 logits is the largest thing ever held. The default
    1024 x 8192 (32 MB) is large enough that each block's matmul runs efficiently and small next to
    the full logits (bench/logprobs.py, docs/performance.md).
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} must be [..., H] and weight "
                         f"{tuple(weight.shape)} [V, H] with the same H")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"token_logprobs: targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"dims {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
                         f"floating dtype")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be an integer tensor, got {targets.dtype}")
    if temperature <= 0 or chunk_size < 1 or vocab_chunk_size < 1:
        raise ValueError(f"token_logprobs: need temperature > 0 and chunk sizes >= 1, got temperature="
                         f"{temperature}, chunk_size={chunk_size}, vocab_chunk_size={vocab_chunk_size}")
    flat_targets = targets.reshape(-1).long()
    real = flat_targets[flat_targets != ignore_index]
    if real.numel() and (real.min() < 0 or real.max() >= weight.shape[0]):
        bad = real[(real < 0) | (real >= weight.shape[0])][0].item()
        raise ValueError(f"token_logprobs: target id {bad} is outside the vocabulary [0, {weight.shape[0]}) "
                         f"and is not ignore_index={ignore_index}")

    grad_on = torch.is_grad_enabled()  # ctx.needs_input_grad ignores no_grad, so decide here
    logprobs, entropy = _FusedTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, float(temperature), chunk_size,
        vocab_chunk_size, ignore_index, return_entropy, hidden_grad_in_forward,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    logprobs = logprobs.reshape(targets.shape)  # fp32, or fp64 for fp64 inputs (gradcheck)
    if return_entropy:
        return logprobs, entropy.reshape(targets.shape)
    return logprobs


# ---------------------------------------------------------------------------------------------------------------------
# The kernel on a causal LM: log-probs of the action tokens of training samples (train.py, warmstart.py)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    prefix_ids: torch.Tensor  # [P] context tokens shared by every sample (the system prompt); P may be 0
    input_ids: torch.Tensor  # [B, S] the rest of each [context + action], right-padded
    attention_mask: torch.Tensor  # [B, P + S] 1 on real tokens
    action_mask: torch.Tensor  # [B, S] True on action tokens (the targets)


def shared_prefix_length(samples) -> int:
    """How many leading context tokens all samples share (chat template + system prompt), keeping at least one context
    token per row after it; 0 when there is nothing worth sharing (sampler.MIN_SHARED_PREFIX)."""
    contexts = [s.context_ids for s in samples]
    length = min(common_prefix_length(contexts), min(len(c) for c in contexts) - 1)
    return length if length >= MIN_SHARED_PREFIX and len(samples) > 1 else 0


def micro_batches(samples, max_rows: int, share_prefix: bool = False) -> list:
    """Split samples into micro-batches of at most max_rows, grouped by length so that little of each is padding.

    A padded batch runs every row to the length of its longest one, and with share_prefix each batch also runs the
    shared prefix once. A minibatch that mixes short samples with long ones (an answer, and a revision that also
    reads the first answer and the feedback) would be mostly padding. So we sort by length and choose the cuts that
    minimise the positions the decoder runs, sum over batches of (shared prefix + rows x longest row), by dynamic
    programming over the sorted list (a count that fits a forward bound by arithmetic: a CPU, or a real model on a
    GPU). Gradients accumulated over the micro-batches sum the same loss, so this changes the cost, not the result
    (up to float rounding). Without a shared prefix nothing pays for a cut in this count, so the batches are the
    sorted samples in runs of max_rows (the fewest batches, with the least padding).
    """
    order = sorted(samples, key=lambda s: len(s.context_ids) + len(s.action_ids))
    prefix = shared_prefix_length(order) if share_prefix and order else 0
    if prefix == 0:
        return [order[i:i + max_rows] for i in range(0, len(order), max_rows)]
    lengths = [len(s.context_ids) + len(s.action_ids) - prefix for s in order]
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)  # best[k]: cost of the first k samples
    for end in range(1, len(order) + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + prefix + (end - start) * lengths[end - 1]  # sorted: the last row is the longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def pad_batch(samples, pad_id, device, share_prefix: bool = False) -> Batch:
    """Right-padded [context + action] ids and masks; with share_prefix the common context prefix is split off."""
    prefix = shared_prefix_length(samples) if share_prefix else 0
    rows = [s.context_ids[prefix:] + s.action_ids for s in samples]
    width = max(len(r) for r in rows)
    # Padded in Python and made directly on `device`: one copy per tensor, nothing left on the default device.
    input_ids = [r + [pad_id] * (width - len(r)) for r in rows]
    action_mask = [[len(s.context_ids) - prefix <= i < len(r) for i in range(width)] for s, r in zip(samples, rows)]
    attention_mask = [[1] * (prefix + len(r)) + [0] * (width - len(r)) for r in rows]
    return Batch(torch.tensor(samples[0].context_ids[:prefix], dtype=torch.long, device=device),
                 torch.tensor(input_ids, dtype=torch.long, device=device),
                 torch.tensor(attention_mask, dtype=torch.long, device=device),
                 torch.tensor(action_mask, dtype=torch.bool, device=device))


def action_logprobs(model, batch: Batch, temperature, chunk_size, with_entropy=False):
    """log pi(a_t | s, a_<t) for every action token, flattened in row-major order: [num_action_tokens].

    We run the decoder to its final hidden states and call the fused kernel on the action positions only, so the
    [tokens, vocab] logits never exist. Tokens are scored under the TEMPERED distribution they were sampled from.
    Shared prefix: every feedback sample starts with the same ~200-token system prompt, which is most of its tokens.
    We run that prefix ONCE, repeat its keys/values over the batch, and run only each row's own tokens on top; the
    gradient still flows into the prefix's LoRA activations through the cache. Same values as the plain forward, a
    fraction of the compute (tests/test_train.py checks values and gradients).
    """
    causal_lm = model.get_base_model()  # LoRA layers live inside it, so the active adapter applies
    decoder = causal_lm.get_decoder()
    prefix_length = batch.prefix_ids.numel()
    if prefix_length == 0:
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=causal_lm.config)  # the decoder fills it in place
        with_cache = {cache_keyword(decoder): cache}
        decoder(input_ids=batch.prefix_ids[None], use_cache=True, **with_cache)
        cache.batch_repeat_interleave(batch.input_ids.shape[0])
        positions = torch.arange(prefix_length, prefix_length + batch.input_ids.shape[1], device=batch.input_ids.device)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=positions[None].expand(batch.input_ids.shape[0], -1),
                         use_cache=True, **with_cache).last_hidden_state
    predicts_action = batch.action_mask[:, 1:]  # hidden state at position i predicts token i + 1
    action_hidden = hidden[:, :-1][predicts_action]
    targets = batch.input_ids[:, 1:][predicts_action]
    return token_logprobs(action_hidden, causal_lm.get_output_embeddings().weight, targets, temperature,
                          chunk_size=chunk_size, return_entropy=with_entropy)

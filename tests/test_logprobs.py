"""The fused chunked log-prob kernel (logprobs.py) against the naive log_softmax + gather reference.

Sizes are deliberately odd (37 tokens, vocab 1001, chunks of 16 tokens and 100 vocabulary entries) so
that no chunk divides evenly and the online-logsumexp carry between vocabulary blocks is exercised.
Tests that take the `device` fixture run on a GPU under bench/gpu_check.py (NANOWALTZ_TEST_DEVICE=cuda).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanowaltz.logprobs import naive_token_logprobs, token_logprobs

N_TOKENS, HIDDEN, VOCAB = 37, 24, 1001
CHUNKS = dict(chunk_size=16, vocab_chunk_size=100)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(dtype=torch.float32, seed=0, shape=(N_TOKENS,), device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, HIDDEN, generator=gen, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype) / HIDDEN ** 0.5 * 3
    targets = torch.randint(0, VOCAB, shape, generator=gen)
    grad_out = torch.randn(shape, generator=gen)  # per-token weights, like advantages in the PPO loss
    return tuple(t.to(device) for t in (hidden, weight, targets, grad_out))


def fused_and_naive(weight_trainable, temperature, hidden_grad_in_forward=True, shape=(N_TOKENS,), device="cpu"):
    """Values and gradients of sum(grad_out * logp) from both implementations."""
    results = []
    for fn in ("fused", "naive"):
        hidden, weight, targets, grad_out = make_inputs(shape=shape, device=device)
        hidden.requires_grad_(True)
        weight.requires_grad_(weight_trainable)
        if fn == "fused":
            logp = token_logprobs(hidden, weight, targets, temperature, hidden_grad_in_forward=hidden_grad_in_forward,
                                  **CHUNKS)
        else:
            logp = naive_token_logprobs(hidden, weight, targets, temperature)
        (logp * grad_out).sum().backward()
        results.append((logp.detach(), hidden.grad, weight.grad))
    return results


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("hidden_grad_in_forward", [True, False])
def test_frozen_weight_matches_naive(temperature, hidden_grad_in_forward, device):
    (logp, grad_h, grad_w), (ref_logp, ref_grad_h, _) = fused_and_naive(False, temperature, hidden_grad_in_forward,
                                                                        device=device)
    assert logp.dtype == torch.float32 and logp.shape == (N_TOKENS,)
    torch.testing.assert_close(logp, ref_logp, **FP32_TOL)
    torch.testing.assert_close(grad_h, ref_grad_h, **FP32_TOL)
    assert grad_w is None


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_trainable_weight_matches_naive(temperature, device):
    (logp, grad_h, grad_w), (ref_logp, ref_grad_h, ref_grad_w) = fused_and_naive(True, temperature, device=device)
    torch.testing.assert_close(logp, ref_logp, **FP32_TOL)
    torch.testing.assert_close(grad_h, ref_grad_h, **FP32_TOL)
    torch.testing.assert_close(grad_w, ref_grad_w, **FP32_TOL)


def test_batched_3d_input_keeps_leading_dims():
    (logp, grad_h, _), (ref_logp, ref_grad_h, _) = fused_and_naive(False, 0.9, shape=(3, 13))
    assert logp.shape == (3, 13) and grad_h.shape == (3, 13, HIDDEN)
    torch.testing.assert_close(logp, ref_logp, **FP32_TOL)
    torch.testing.assert_close(grad_h, ref_grad_h, **FP32_TOL)


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_ignore_index_gives_zero_logprob_and_zero_grad(weight_trainable, device):
    hidden, weight, targets, grad_out = make_inputs(device=device)
    masked = torch.zeros(N_TOKENS, dtype=torch.bool, device=device)
    masked[[0, 5, 16, 36]] = True  # includes chunk boundaries
    targets_with_ignore = targets.masked_fill(masked, -100)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_trainable)
    logp, entropy = token_logprobs(hidden, weight, targets_with_ignore, 0.8, return_entropy=True, **CHUNKS)
    (logp * grad_out).sum().backward()
    assert torch.all(logp[masked] == 0) and torch.all(entropy[masked] == 0)
    assert torch.all(hidden.grad[masked] == 0)
    # Unmasked tokens: exactly the naive loss with masked tokens left out.
    fused_grads = (hidden.grad.clone(), None if weight.grad is None else weight.grad.clone())
    hidden.grad, weight.grad = None, None
    ref = naive_token_logprobs(hidden, weight, targets, 0.8)
    (ref * grad_out * ~masked).sum().backward()
    torch.testing.assert_close(logp[~masked], ref[~masked].detach(), **FP32_TOL)
    torch.testing.assert_close(fused_grads[0], hidden.grad, **FP32_TOL)
    if weight_trainable:
        torch.testing.assert_close(fused_grads[1], weight.grad, **FP32_TOL)


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor any ATen op returns (views included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("hidden_grad_in_forward", [True, False])
def test_frozen_weight_allocates_nothing_vocab_by_hidden(hidden_grad_in_forward):
    def run(weight_trainable):
        hidden, weight, targets, grad_out = make_inputs()
        hidden.requires_grad_(True)
        weight.requires_grad_(weight_trainable)
        logp = token_logprobs(hidden, weight, targets, hidden_grad_in_forward=hidden_grad_in_forward, **CHUNKS)
        with RecordShapes() as recorder:
            (logp * grad_out).sum().backward()
        return recorder.shapes, weight.grad

    frozen_shapes, frozen_grad = run(False)
    assert frozen_grad is None
    assert (VOCAB, HIDDEN) not in frozen_shapes
    # The recorder does see the [V, H] gradient when the weight is trainable, so the check above can fail.
    trainable_shapes, _ = run(True)
    assert (VOCAB, HIDDEN) in trainable_shapes


def test_entropy_matches_float64_entropy(device):
    hidden, weight, targets, _ = make_inputs(device=device)
    logp, entropy = token_logprobs(hidden, weight, targets, 0.6, return_entropy=True, **CHUNKS)
    log_probs = (hidden.double() @ weight.double().T / 0.6).log_softmax(-1)
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.testing.assert_close(entropy, ref_entropy.float(), **FP32_TOL)
    torch.testing.assert_close(logp, log_probs.gather(-1, targets[:, None]).squeeze(-1).float(), **FP32_TOL)
    assert not entropy.requires_grad


def test_bf16_close_to_fp32_reference(device):
    hidden, weight, targets, grad_out = make_inputs(dtype=torch.bfloat16, device=device)
    hidden.requires_grad_(True)
    logp = token_logprobs(hidden, weight, targets, 0.9, **CHUNKS)
    (logp * grad_out).sum().backward()
    assert logp.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    # Reference: the same (bf16-rounded) numbers in fp32, so only the kernel's own rounding is measured.
    hidden32 = hidden.detach().float().requires_grad_(True)
    ref = naive_token_logprobs(hidden32, weight.float(), targets, 0.9)
    (ref * grad_out).sum().backward()
    # bf16 matmul outputs carry ~2^-9 relative error; logits here are O(10), so a few 1e-2 absolute.
    torch.testing.assert_close(logp, ref.detach(), rtol=0.0, atol=0.1)
    torch.testing.assert_close(hidden.grad.float(), hidden32.grad, rtol=0.02, atol=0.1)
    assert torch.all(logp <= 0)


def test_tied_embedding_weight_gets_both_gradients():
    """Small models tie lm_head to the input embedding: the weight's grad sums both uses."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    targets = torch.randint(0, VOCAB, (2, 9), generator=gen)
    mix = torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN ** 0.5
    grads = []
    fused = lambda h, w, y: token_logprobs(h, w, y, 0.8, **CHUNKS)  # noqa: E731
    for fn in (fused, lambda h, w, y: naive_token_logprobs(h, w, y, 0.8)):
        embedding = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        hidden = torch.tanh(embedding[input_ids] @ mix)  # stands in for the transformer body
        fn(hidden, embedding, targets).sum().backward()
        grads.append(embedding.grad)
    torch.testing.assert_close(grads[0], grads[1], **FP32_TOL)


@pytest.mark.parametrize("hidden_grad_in_forward", [True, False])
def test_gradcheck_float64(hidden_grad_in_forward):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 3, dtype=torch.float64, generator=gen)
    targets = torch.tensor([0, 10, -100, 4, 7])

    def fused(h, w):
        return token_logprobs(h, w, targets, 0.8, chunk_size=2, vocab_chunk_size=4,
                              hidden_grad_in_forward=hidden_grad_in_forward)

    assert torch.autograd.gradcheck(fused, (hidden, weight))  # frozen weight
    assert torch.autograd.gradcheck(fused, (hidden, weight.clone().requires_grad_(True)))


def test_no_grad_mode_returns_plain_tensor():
    hidden, weight, targets, _ = make_inputs()
    hidden.requires_grad_(True)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets, **CHUNKS)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, naive_token_logprobs(hidden, weight, targets).detach(), **FP32_TOL)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, _ = make_inputs()
    with pytest.raises(ValueError, match="target id 1001 is outside the vocabulary"):
        token_logprobs(hidden, weight, targets.clone().fill_(VOCAB))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="same H"):
        token_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="temperature > 0"):
        token_logprobs(hidden, weight, targets, temperature=0.0)

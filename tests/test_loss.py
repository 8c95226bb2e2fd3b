"""Tests of prior.loss against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prior.loss import (
    _ChunkedCrossEntropy,
    effective_weights,
    prior_loss,
    token_cross_entropy,
    token_weights,
    weight_stats,
)

B, T, V = 4, 7, 13
# Rows of different lengths, one without any loss token; position 0 is a "prompt" position.
LENGTHS = (6, 3, 0, 5)


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random logits, targets (-100 off the mask), raw weights in [0, 1] and a ragged loss mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=gen)).to(dtype).requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        mask[row, 1 : 1 + length] = True
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[~mask] = -100
    weights = torch.rand(B, T, generator=gen)
    return logits, targets, weights, mask


def reference_loss(logits, targets, weights, mask, reduction: str = "mean") -> torch.Tensor:
    """The PRIOR formula written out caption by caption in float64 with a naive log-softmax."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    total = logprobs.new_zeros(())
    count = 0
    for row in range(logits.shape[0]):
        pos = mask[row].nonzero().squeeze(1)
        k = pos.numel()
        if k == 0:
            continue
        ce = -logprobs[row, pos, targets[row, pos]]
        if weights is None:
            eff = torch.ones(k, dtype=torch.float64)
        else:
            w = weights[row, pos].double()
            s = w.sum()
            eff = k * w / s if (math.isfinite(s.item()) and s.item() > 0) else torch.ones(k, dtype=torch.float64)
        total = total + (eff * ce).sum()
        count += k
    return total if reduction == "sum" else total / max(count, 1)


def grad_of(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_ntp_equals_cross_entropy_mean():
    logits, targets, _, mask = make_batch()
    ours = prior_loss(logits, targets, None, mask)
    theirs = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_of(ours, logits), grad_of(theirs, logits), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("constant", [1.0, 0.37, 5.0])
def test_equal_weights_equal_ntp(constant):
    logits, targets, _, mask = make_batch()
    weights = torch.full((B, T), constant)
    ours = prior_loss(logits, targets, weights, mask)
    theirs = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_per_caption_normalisation_matches_formula():
    logits, targets, weights, mask = make_batch(seed=1)
    ours = prior_loss(logits, targets, weights, mask)
    expected = reference_loss(logits.detach(), targets, weights, mask)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
    # The weighting must matter: the result differs from plain NTP.
    assert not torch.isclose(ours, prior_loss(logits, targets, None, mask), rtol=1e-3)


def test_effective_weights_average_one_per_caption():
    _, _, weights, mask = make_batch(seed=2)
    eff = effective_weights(weights, mask)
    assert eff.dtype == torch.float32
    assert torch.all(eff[~mask] == 0)
    for row, length in enumerate(LENGTHS):
        if length:
            torch.testing.assert_close(eff[row].sum(), torch.tensor(float(length)))
            w = weights[row][mask[row]]
            torch.testing.assert_close(eff[row][mask[row]], length * w / w.sum())


def test_masked_positions_contribute_nothing():
    logits, targets, weights, mask = make_batch(seed=3)
    loss = prior_loss(logits, targets, weights, mask)
    grad = grad_of(loss, logits)
    assert torch.all(grad[~mask] == 0)

    changed_logits = logits.detach().clone()
    changed_logits[~mask] = 1e4 * torch.randn(int((~mask).sum()), V)
    changed_logits.requires_grad_()
    changed_targets = targets.clone()
    changed_targets[~mask] = V + 7  # a pad id outside the vocabulary
    changed_weights = weights.clone()
    changed_weights[~mask] = float("nan")
    changed = prior_loss(changed_logits, changed_targets, changed_weights, mask)
    assert torch.equal(changed, loss)
    assert torch.equal(grad_of(changed, changed_logits), grad)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * V * 4, 2**26])
def test_gradients_match_float64_reference(chunk_bytes):
    logits, targets, weights, mask = make_batch(seed=4)
    ours = prior_loss(logits, targets, weights, mask, chunk_bytes=chunk_bytes)
    ref_logits = logits.detach().double().requires_grad_()
    ref = reference_loss(ref_logits, targets, weights, mask)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-6, atol=0)
    grad = grad_of(ours, logits)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), grad_of(ref, ref_logits), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_computed_in_fp32(dtype):
    logits, targets, weights, mask = make_batch(seed=5, dtype=dtype)
    ours = prior_loss(logits, targets, weights, mask, chunk_bytes=1)
    assert ours.dtype == torch.float32
    # Reference on the very same (rounded) logit values: any gap is compute precision.
    ref_logits = logits.detach().double().requires_grad_()
    ref = reference_loss(ref_logits, targets, weights, mask)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=0)
    grad = grad_of(ours, logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), grad_of(ref, ref_logits), rtol=1e-2, atol=1e-5)


def test_no_full_size_tensor_saved_for_backward():
    big_v = 1000
    logits = torch.randn(2, 8, big_v, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    targets = torch.randint(0, big_v, (2, 8))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prior_loss(logits, targets, torch.rand(2, 8), mask, chunk_bytes=4 * big_v)
    assert saved
    for t in saved:
        assert t.numel() < logits.numel() or t.data_ptr() == logits.data_ptr(), (t.dtype, t.shape)


def test_zero_weight_caption_falls_back_to_ntp():
    logits, targets, weights, mask = make_batch(seed=6)
    for bad in (0.0, float("inf")):
        weights[0] = bad
        row = slice(0, 1)
        alone = prior_loss(logits[row], targets[row], weights[row], mask[row])
        torch.testing.assert_close(alone, prior_loss(logits[row], targets[row], None, mask[row]))
        torch.testing.assert_close(effective_weights(weights, mask)[0], mask[0].float())
        whole = prior_loss(logits, targets, weights, mask)
        torch.testing.assert_close(whole.double(), reference_loss(logits.detach(), targets, weights, mask))
        assert torch.isfinite(whole)


def test_weights_never_get_gradients():
    logits, targets, weights, mask = make_batch(seed=7)
    weights.requires_grad_()
    prior_loss(logits, targets, weights, mask).backward()
    assert weights.grad is None
    assert logits.grad is not None
    ref_logprobs = torch.randn(3, 4).clamp(max=0).requires_grad_()
    assert not token_weights(ref_logprobs).requires_grad


def test_reduction_sum_is_mean_times_token_count():
    logits, targets, weights, mask = make_batch(seed=8)
    total = prior_loss(logits, targets, weights, mask, reduction="sum")
    mean = prior_loss(logits, targets, weights, mask, reduction="mean")
    torch.testing.assert_close(total, mean * mask.sum())
    torch.testing.assert_close(total.double(), reference_loss(logits.detach(), targets, weights, mask, "sum"))
    with pytest.raises(ValueError, match="reduction"):
        prior_loss(logits, targets, weights, mask, reduction="none")


def test_batch_without_loss_tokens_is_zero_and_differentiable():
    logits, targets, weights, _ = make_batch(seed=9)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for w in (None, weights):
        loss = prior_loss(logits, targets, w, mask)
        assert loss.item() == 0.0
        assert loss.requires_grad
        assert torch.all(grad_of(loss, logits) == 0)


def test_non_contiguous_shifted_logits():
    logits, targets, weights, mask = make_batch(seed=10)
    shifted = logits[:, :-1]
    assert not shifted.is_contiguous()
    ours = prior_loss(shifted, targets[:, 1:], weights[:, 1:], mask[:, 1:])
    ref = reference_loss(shifted.detach(), targets[:, 1:], weights[:, 1:], mask[:, 1:])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)
    grad = grad_of(ours, logits)
    assert torch.all(grad[:, -1] == 0)


def test_token_cross_entropy_per_position():
    logits, targets, _, mask = make_batch(seed=11)
    ce = token_cross_entropy(logits, targets, mask, chunk_bytes=1)
    assert ce.shape == (B, T) and ce.dtype == torch.float32
    assert torch.all(ce[~mask] == 0)
    expected = F.cross_entropy(logits[mask].double(), targets[mask], reduction="none")
    torch.testing.assert_close(ce[mask].double(), expected, rtol=1e-6, atol=1e-7)


def test_misaligned_inputs_fail_loudly():
    logits, targets, weights, mask = make_batch(seed=12)
    targets[mask] = -100
    with pytest.raises(ValueError, match="misaligned"):
        prior_loss(logits, targets, weights, mask)
    with pytest.raises(ValueError, match="bool"):
        prior_loss(logits, targets, weights, mask.long())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        prior_loss(logits, targets[:, 1:], weights, mask)


def test_token_weights_formula_and_alpha():
    logprobs = torch.tensor([0.0, -1e-10, -0.1, -0.6931, -3.0, -50.0, 0.2])
    expected = (1 - torch.exp(logprobs.double())).clamp(0, 1)
    expected[1] = 1e-10  # 1 - exp(x) cancels in floating point; expm1 must not
    w = token_weights(logprobs)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
    assert w[0] == 0 and w[-1] == 0  # certain tokens, and impossible "probabilities" > 1
    torch.testing.assert_close(token_weights(logprobs, alpha=2.0).double(), expected**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(token_weights(logprobs, alpha=0.5).double(), expected.sqrt(), rtol=1e-6, atol=0)
    assert torch.all(token_weights(logprobs, alpha=0.0) == 1)
    with pytest.raises(ValueError, match="alpha"):
        token_weights(logprobs, alpha=-1.0)


def test_weight_stats_hand_computed():
    weights = torch.tensor([[0.5, 1.0, 0.5, 9.0], [0.2, 0.6, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    stats = weight_stats(weights, mask)
    # Row 0: ESS = 2^2 / 1.5 = 8/3; row 1: ESS = 0.8^2 / 0.4 = 1.6; row 2 has no loss token.
    expected = {
        "weight_mean": 0.56,
        "weight_std": math.sqrt(0.332 / 5),
        "ess_per_caption": (8 / 3 + 1.6) / 2,
        "ess_fraction": (8 / 9 + 0.8) / 2,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-6), key


def test_chunked_cross_entropy_gradcheck():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 1])
    cols = torch.tensor([0, 2, 1, 2])
    targets = torch.tensor([4, 0, 2, 2])
    assert torch.autograd.gradcheck(lambda x: _ChunkedCrossEntropy.apply(x, rows, cols, targets, 3), (logits,))

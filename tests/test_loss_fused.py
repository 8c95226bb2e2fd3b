"""The fused head + token-weighted cross-entropy (prior.loss.linear_token_cross_entropy) against
autograd on the naive logits, and its opt-in use in LVLM training (``model.fused_loss``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from prior.data.tokenization import train_bpe_tokenizer
from prior.loss import linear_token_cross_entropy
from tests.test_lvlm_training import first_batch, lvlm_cfg
from tests.test_models import CAPTIONS, make, make_batch

N, D, V = 10, 6, 13


def make_inputs(dtype: torch.dtype = torch.float64, seed: int = 0):
    """Hidden states, head weight (both requiring grad), targets and non-uniform coefficients."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    coef = 2 * torch.rand(N, generator=gen)
    return hidden, weight, targets, coef


def naive(hidden, weight, targets, coef):
    """The reference: full logits, F.cross_entropy, weighted sum; autograd does the rest."""
    ce = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    return (coef.to(ce.dtype) * ce).sum(), ce


def rows(n: int, dtype: torch.dtype = torch.float64) -> int:
    """chunk_bytes for chunks of ``n`` rows of ``dtype`` inputs."""
    return n * V * torch.promote_types(dtype, torch.float32).itemsize


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, N, 0], ids=lambda n: f"rows{n}")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_loss_and_gradients_equal_autograd_on_the_full_logits(chunk_rows, dtype, tol):
    """Chunks of 1 row, of 3 and 4 (neither divides N), all rows at once, and a budget below one
    row (which must still make progress, one row at a time)."""
    chunk_bytes = rows(chunk_rows, dtype) if chunk_rows else 1
    hidden, weight, targets, coef = make_inputs(dtype)
    objective, ce = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=chunk_bytes)
    ref_objective, ref_ce = naive(hidden, weight, targets, coef)
    assert objective.dtype == ce.dtype == torch.promote_types(dtype, torch.float32)
    assert objective.dim() == 0 and not ce.requires_grad
    torch.testing.assert_close(objective, ref_objective, rtol=tol, atol=tol)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=tol, atol=tol)
    # A backward scale other than 1 (as under gradient accumulation) must reach both gradients.
    grads = torch.autograd.grad(2.5 * objective, (hidden, weight))
    ref_grads = torch.autograd.grad(2.5 * ref_objective, (hidden, weight))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_frozen_weight_gets_no_gradient_and_hidden_still_the_right_one():
    hidden, weight, targets, coef = make_inputs()
    weight.requires_grad_(False)
    objective, _ = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=rows(3))
    objective.backward()
    assert weight.grad is None
    (ref,) = torch.autograd.grad(naive(hidden, weight, targets, coef)[0], (hidden,))
    torch.testing.assert_close(hidden.grad, ref, rtol=1e-12, atol=1e-12)


def test_weight_gradient_without_a_hidden_gradient():
    hidden, weight, targets, coef = make_inputs()
    hidden.requires_grad_(False)
    objective, _ = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=rows(3))
    (grad,) = torch.autograd.grad(objective, (weight,))
    (ref,) = torch.autograd.grad(naive(hidden, weight, targets, coef)[0], (weight,))
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)


def test_rows_with_coefficient_zero_carry_no_loss_and_no_gradient():
    hidden, weight, targets, coef = make_inputs()
    dropped = torch.tensor([0, 3, 4, 9])
    coef[dropped] = 0.0
    objective, ce = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=rows(4))
    grad_hidden, grad_weight = torch.autograd.grad(objective, (hidden, weight))
    assert bool((grad_hidden[dropped] == 0).all()) and bool((ce[dropped] > 0).all())
    kept = torch.ones(N, dtype=torch.bool)
    kept[dropped] = False
    ref_objective, _ = naive(hidden[kept], weight, targets[kept], coef[kept])
    (ref_weight,) = torch.autograd.grad(ref_objective, (weight,))
    torch.testing.assert_close(objective, ref_objective, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-100, V])
def test_targets_outside_the_vocabulary_are_refused(bad):
    hidden, weight, targets, coef = make_inputs()
    targets[2] = bad
    with pytest.raises(ValueError, match=rf"\[0, {V}\).*{bad}"):
        linear_token_cross_entropy(hidden, weight, targets, coef)


def test_without_grad_mode_it_is_a_plain_cross_entropy():
    hidden, weight, targets, coef = make_inputs()
    with torch.no_grad():
        objective, ce = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=rows(3))
    assert objective.grad_fn is None
    torch.testing.assert_close(ce, naive(hidden, weight, targets, coef)[1].detach(), rtol=1e-12, atol=1e-12)


def test_a_second_backward_is_refused():
    hidden, weight, targets, coef = make_inputs()
    objective, _ = linear_token_cross_entropy(hidden, weight, targets, coef)
    objective.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        objective.backward()


def test_bf16_is_close_to_fp32():
    hidden, weight, targets, coef = make_inputs(torch.float32)
    objective, ce = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=rows(3, torch.float32))
    grads = torch.autograd.grad(objective, (hidden, weight))
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    objective16, ce16 = linear_token_cross_entropy(h16, w16, targets, coef, min_chunk_rows=1, chunk_bytes=rows(3, torch.float32))
    grads16 = torch.autograd.grad(objective16, (h16, w16))
    assert objective16.dtype == ce16.dtype == torch.float32
    torch.testing.assert_close(objective16, objective, rtol=2e-2, atol=0)
    torch.testing.assert_close(ce16, ce, rtol=5e-2, atol=5e-2)
    for g16, g in zip(grads16, grads, strict=True):
        assert g16.dtype == torch.bfloat16
        assert float((g16.float() - g).abs().max()) <= 3e-2 * float(g.abs().max())


@pytest.mark.parametrize("chunk_bytes", [rows(N, torch.float32), rows(3, torch.float32)], ids=["one_chunk", "chunks"])
def test_under_autocast_it_rounds_like_the_logits_path(chunk_bytes):
    """fp32 master weights under bf16 autocast: bf16 logits and matmuls, as nn.Linear computes them
    there. In one chunk every op is the logits path's; in several, each chunk's weight gradient is
    rounded to bf16 before the fp32 sum, instead of the whole sum once: half a bf16 ulp apart."""
    hidden, weight, targets, coef = make_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective, ce = linear_token_cross_entropy(hidden, weight, targets, coef, min_chunk_rows=1, chunk_bytes=chunk_bytes)
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    ref_ce = F.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(objective, (hidden, weight))
    ref_grads = torch.autograd.grad((coef * ref_ce).sum(), (hidden, weight))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        ulp = 0.0 if chunk_bytes == rows(N, torch.float32) else 2.0**-8 * float(r.abs().max())
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 + ulp)


# ---------------------------------------------------------------------- the LVLM's hidden states


@pytest.fixture(scope="module")
def tokenizer():
    texts = CAPTIONS + ["click to enlarge", "user 123 posted on 2024-01-02 for $9.99"]
    return train_bpe_tokenizer(texts * 10, vocab_size=300)


@pytest.mark.parametrize(("backbone", "llm"), [("encoder_free", "tiny_llama"), ("visual_encoder", "tiny_qwen2"),
                                                ("encoder_free", "tiny_gpt2")])
def test_hidden_states_times_the_head_weight_are_the_logits(tokenizer, backbone, llm):
    model = make(tokenizer, backbone, llm)
    batch = make_batch(tokenizer, sizes=((32, 32), (16, 24), (20, 12)))
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("image_mask"))
    with torch.no_grad():
        out = model(*args)
        fused = model(*args, hidden=True)
    assert fused.logits is None and fused.hidden.shape == (*out.targets.shape, model.llm.config.hidden_size)
    assert torch.equal(fused.targets, out.targets) and torch.equal(fused.loss_mask, out.loss_mask)
    torch.testing.assert_close(fused.hidden @ model.head_weight.T, out.logits, rtol=1e-5, atol=1e-5)


def test_a_head_that_is_not_a_plain_matmul_is_refused(tokenizer):
    model = make(tokenizer)
    model.llm.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping.*fused_loss=false"):
        model.head_weight
    model.llm.config.final_logit_softcapping = None
    vocab, width = model.head_weight.shape
    model.llm.lm_head = torch.nn.Linear(width, vocab, bias=True)
    batch = make_batch(tokenizer)
    with pytest.raises(ValueError, match="bias.*fused_loss=false"):
        model(batch["images"], batch["input_ids"], batch["attention_mask"], hidden=True)


# ---------------------------------------------------------------------- LVLM training


def parameter_grads(module, objective):
    params = [p for p in module.model.parameters() if p.requires_grad]
    return torch.autograd.grad(objective, params, allow_unused=True)


@pytest.mark.parametrize("backbone", ["encoder_free", "visual_encoder"])
def test_fused_loss_gives_the_logits_path_losses_and_gradients(demo, backbone):
    _, batch = first_batch(lvlm_cfg(demo, "loss=prior", backbone=backbone))
    for loss in ("ntp", "prior", "oracle"):
        module = instantiate(lvlm_cfg(demo, f"loss={loss}", "model.fused_loss=true", backbone=backbone).model,
                             _recursive_=False)
        assert module.fused_loss and module.hparams.fused_loss
        fused = module._losses(batch)
        fused_grads = parameter_grads(module, fused["objective_sum"])
        module.fused_loss = False
        ref = module._losses(batch)
        ref_grads = parameter_grads(module, ref["objective_sum"])
        assert fused.keys() == ref.keys()
        assert torch.equal(fused["tokens"], ref["tokens"]) and torch.equal(fused["mask"], ref["mask"])
        if loss != "ntp":
            assert torch.equal(fused["weights"], ref["weights"])
        for key in ("objective_sum", "ntp_sum"):
            torch.testing.assert_close(fused[key], ref[key].detach(), rtol=1e-5, atol=0)
        assert sum(g is not None for g in ref_grads) > 0
        for g, r in zip(fused_grads, ref_grads, strict=True):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
    # A scheme whose weights need the LVLM's own predictions keeps the logits path.
    rho = instantiate(lvlm_cfg(demo, "loss=rho", "model.fused_loss=true", backbone=backbone).model,
                      _recursive_=False)
    assert not rho.fused_loss


def test_fused_loss_auto_falls_back_where_it_cannot_apply_and_true_refuses(demo):
    """The default (auto) takes the fused loss for a plain head and the logits path for a head
    with logit soft-capping; fused_loss=true refuses that head; false never fuses."""
    assert instantiate(lvlm_cfg(demo, "loss=prior").model, _recursive_=False).fused_loss
    capped = "+llm.config.final_logit_softcapping=30.0"
    assert not instantiate(lvlm_cfg(demo, "loss=prior", capped).model, _recursive_=False).fused_loss
    with pytest.raises(Exception, match="final_logit_softcapping"):  # Hydra wraps the ValueError
        instantiate(lvlm_cfg(demo, "loss=prior", capped, "model.fused_loss=true").model, _recursive_=False)
    assert not instantiate(lvlm_cfg(demo, "loss=prior", "model.fused_loss=false").model, _recursive_=False).fused_loss

"""The PRIOR loss: next-token prediction re-weighted per token by a text-only reference LM.

For one caption (one row of the batch) with ``k`` loss-bearing tokens ``t_1..t_k``::

    w_i      = (1 - P_ref(t_i | t_<i)) ** alpha                      (token_weights)
    L_NTP    = - sum_i log p(t_i | v, t_<i)
    L_PRIOR  = - sum_i  k * (w_i / sum_j w_j) * log p(t_i | v, t_<i)

``i`` and ``j`` run over the loss tokens of that caption only, so the effective weights
``k * w_i / sum_j w_j`` average 1 inside each caption: every caption keeps NTP's loss mass and
only its distribution over tokens changes. With every ``w_i`` equal, L_PRIOR == L_NTP. A caption
whose weights sum to 0 (or to a non-finite value) falls back to uniform weights. Weights come
from a frozen model and never carry gradient.

Other token-weighting schemes (:mod:`prior.weighting`: Rho-1, CAL, DPA, ...) supply their own
raw weights to the same functions, some normalised over the batch instead of per caption.

The batch loss (``reduction="mean"``) is the sum of the weighted token losses over all loss
tokens of the batch divided by their number, i.e. the token mean, as ``F.cross_entropy`` does.

The cross-entropy is computed in (at least) fp32 whatever the logits dtype, by
:class:`_ChunkedCrossEntropy`, which never materialises a full-size fp32 copy of the logits or
a full-size (log-)softmax: with a 128k vocabulary the logits are the largest tensor of a step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_BYTES",
    "NORMALISATIONS",
    "effective_weights",
    "prior_loss",
    "token_cross_entropy",
    "token_weights",
    "weight_stats",
]

CHUNK_BYTES = 64 * 2**20
"""Target size of one chunk of rows of logits in the compute dtype; the cross-entropy's extra
working memory is a small multiple (about 3x) of it, plus the gradient of the logits."""


NORMALISATIONS = ("caption", "batch")
"""How :func:`effective_weights` normalises raw weights: per caption (PRIOR) or over the batch."""


def token_weights(ref_logprobs: Tensor, alpha: float = 1.0) -> Tensor:
    """PRIOR token weights ``(1 - exp(ref_logprobs)) ** alpha`` in fp32, in [0, 1], without gradient.

    ``ref_logprobs`` are the reference LM's log-probabilities of the caption tokens (any shape).
    """
    if alpha < 0:
        raise ValueError(
            f"alpha must be >= 0, got {alpha}: a negative power turns certain tokens into infinite weights"
        )
    surprise = (-torch.expm1(ref_logprobs.detach().float())).clamp_(0.0, 1.0)
    return surprise if alpha == 1.0 else surprise.pow_(alpha)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of selected positions of ``[B, T, V]`` logits, chunk by chunk over positions.

    Forward returns the per-position cross-entropy ``[N]`` in the compute dtype (fp32, or fp64 for
    fp64 logits) and saves only the indices, targets and per-position logsumexp; backward
    recomputes the softmax chunk by chunk and returns a gradient of the logits' dtype and shape,
    zero at the positions that were not selected.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        rows: Tensor,
        cols: Tensor,
        targets: Tensor,
        chunk: int,
    ) -> Tensor:
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        n = rows.numel()
        lse = torch.empty(n, dtype=compute_dtype, device=logits.device)
        ce = torch.empty(n, dtype=compute_dtype, device=logits.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            x = logits[rows[s:e], cols[s:e]].to(compute_dtype)
            lse[s:e] = torch.logsumexp(x, dim=-1)
            ce[s:e] = lse[s:e] - x.gather(1, targets[s:e, None]).squeeze(1)
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk = chunk
        return ce

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_ce: Tensor
    ) -> tuple[Tensor | None, ...]:
        logits, rows, cols, targets, lse = ctx.saved_tensors
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        n, chunk = rows.numel(), ctx.chunk
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            # The indexing copies the chunk, so the in-place ops below never touch the logits.
            p = logits[rows[s:e], cols[s:e]].to(lse.dtype)
            p.sub_(lse[s:e, None]).exp_()
            p.scatter_add_(1, targets[s:e, None], p.new_full((e - s, 1), -1.0))
            p.mul_(grad_ce[s:e, None].to(p.dtype))
            grad[rows[s:e], cols[s:e]] = p.to(logits.dtype)
        return grad, None, None, None, None


def token_cross_entropy(
    logits: Tensor, targets: Tensor, loss_mask: Tensor, *, chunk_bytes: int = CHUNK_BYTES
) -> Tensor:
    """Per-token cross-entropy ``[B, T]`` (fp32, fp64 for fp64 logits), zero where ``loss_mask`` is False.

    ``logits`` ``[B, T, V]`` may be any float dtype and need not be contiguous (a shifted slice
    is fine); ``targets`` ``[B, T]`` are aligned with them (position t predicts ``targets[t]``)
    and are read only at loss positions, where they must lie in ``[0, V)``. Only loss positions
    are processed; their gradient is exact and the gradient at other positions is zero.
    """
    _check_shapes(logits, targets, loss_mask)
    batch, length, vocab = logits.shape
    rows, cols = loss_mask.nonzero(as_tuple=True)
    tgt = targets[rows, cols].long()
    if tgt.numel() and bool(((tgt < 0) | (tgt >= vocab)).any()):
        bad = tgt[(tgt < 0) | (tgt >= vocab)][:5].tolist()
        raise ValueError(
            f"targets at loss positions must lie in [0, {vocab}), found {bad}: an ignore index or a "
            "pad id under loss_mask means the labels and the loss mask are misaligned"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    chunk = max(1, chunk_bytes // (vocab * compute_dtype.itemsize))
    ce = _ChunkedCrossEntropy.apply(logits, rows, cols, tgt, chunk)
    return ce.new_zeros(batch, length).index_put((rows, cols), ce)


def effective_weights(weights: Tensor, loss_mask: Tensor, normalise: str = "caption") -> Tensor:
    """Normalised weights ``[B, T]`` in fp32, zero off the loss mask, without gradient.

    ``normalise="caption"`` (PRIOR): ``k * w_i / sum_j w_j`` over each row's ``k`` loss tokens,
    so each row's effective weights average 1. ``normalise="batch"``: ``n * w_i / sum_j w_j``
    over all ``n`` loss tokens of the batch, so the token mean of the weighted loss is
    ``sum(w * ce) / sum(w)``. A group (row or batch) whose weight sum is 0 or not finite gets
    uniform weights (1).
    """
    if weights.shape != loss_mask.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} and loss_mask {tuple(loss_mask.shape)} must have one shape [B, T]"
        )
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    w = torch.where(loss_mask, weights.detach().float(), 0.0)
    dims = (0, 1) if normalise == "batch" else (1,)
    total = w.sum(dim=dims, keepdim=True)
    count = loss_mask.sum(dim=dims, keepdim=True).float()
    usable = torch.isfinite(total) & (total > 0)
    scaled = w * (count / torch.where(usable, total, 1.0))
    return torch.where(usable, scaled, loss_mask.float())


def prior_loss(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    loss_mask: Tensor,
    *,
    reduction: str = "mean",
    normalise: str = "caption",
    chunk_bytes: int = CHUNK_BYTES,
) -> Tensor:
    """The PRIOR loss (plain NTP when ``weights`` is None) as an fp32 scalar.

    Args:
        logits: ``[B, T, V]`` in any float dtype.
        targets: ``[B, T]`` token ids aligned with ``logits``; values off the loss mask are ignored.
        weights: ``[B, T]`` raw token weights (e.g. from :func:`token_weights`), or None for NTP.
            Normalised by :func:`effective_weights` (per caption unless ``normalise="batch"``);
            never differentiated.
        loss_mask: ``[B, T]`` bool, True at the positions that carry loss.
        reduction: ``"mean"``: the weighted sum divided by the number of loss tokens in the batch
            (the token mean, equal to ``F.cross_entropy`` when weights are None or all equal).
            ``"sum"``: the weighted sum alone. Use it under DDP or gradient accumulation and
            divide by the loss-token count summed over all ranks and accumulation steps: a mean
            of per-batch means is wrong when token counts differ.
        normalise: ``"caption"`` (PRIOR) or ``"batch"``, see :func:`effective_weights`.
        chunk_bytes: size of the chunks of logits the cross-entropy works on (see ``CHUNK_BYTES``).

    A batch without loss tokens gives 0, still connected to the graph.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    ce = token_cross_entropy(logits, targets, loss_mask, chunk_bytes=chunk_bytes)
    total = ce.sum() if weights is None else (ce * effective_weights(weights, loss_mask, normalise)).sum()
    if reduction == "sum":
        return total
    return total / loss_mask.sum().clamp(min=1)


def weight_stats(weights: Tensor, loss_mask: Tensor, normalise: str = "caption") -> dict[str, Tensor]:
    """Logging summary of a batch's token weights over its loss tokens (NaN without loss tokens).

    Keys: ``weight_mean`` and ``weight_std`` (population std) of the raw weights;
    ``ess_per_caption``: the effective number of tokens per caption, ``(sum w)^2 / sum w^2`` of
    the effective weights the loss uses (``normalise`` as in :func:`effective_weights`), averaged
    over captions with loss tokens;
    ``ess_fraction``: the same divided by the caption's loss-token count (1 = uniform).
    """
    w = weights.detach().float()[loss_mask]
    eff = effective_weights(weights, loss_mask, normalise)
    count = loss_mask.sum(dim=1).float()
    has_tokens = count > 0
    ess = eff.sum(dim=1).square() / eff.square().sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    ess, count = ess[has_tokens], count[has_tokens]
    return {
        "weight_mean": w.mean(),
        "weight_std": w.std(correction=0),
        "ess_per_caption": ess.mean(),
        "ess_fraction": (ess / count).mean(),
    }


def _check_shapes(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> None:
    """Raise if the shapes or dtypes of the cross-entropy inputs do not fit together."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, T, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"targets {tuple(targets.shape)} and loss_mask {tuple(loss_mask.shape)} must both be "
            f"[B, T] = {tuple(logits.shape[:2])} like the logits"
        )
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool tensor, got {loss_mask.dtype}: pass `mask.bool()`")

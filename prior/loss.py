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
:func:`linear_token_cross_entropy` goes one step further and takes the LM's final hidden states
and output-embedding weight instead of logits, so the logits and their gradient never exist at
full size at all.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_BYTES",
    "NORMALISATIONS",
    "effective_weights",
    "linear_token_cross_entropy",
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


class _LinearCrossEntropy(torch.autograd.Function):
    """The coefficient-weighted cross-entropy sum of ``hidden @ weight.T``, chunk by chunk over rows.

    The output is a scalar, so its gradients are known up to one scalar factor as soon as the
    softmax of a chunk is: forward computes them right away, chunk by chunk, and keeps only
    ``grad_hidden`` ``[N, d]`` and ``grad_weight`` ``[V, d]``; backward scales them, in place.
    Recomputing the logits in backward instead (as :class:`_ChunkedCrossEntropy` does) would cost
    a fourth matmul of the head's size for no memory saved. Forward also returns the per-row
    cross-entropy, which carries no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        coef: Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> tuple[Tensor, Tensor]:
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        # `needs_input_grad` ignores grad mode, so no_grad (validation) is passed in explicitly.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        n = hidden.shape[0]
        coef = coef.to(acc_dtype)
        ce = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        # The caller chose the matmul dtype (autocast's, if on); autocast must not cast again here.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)  # the weight itself when the dtypes agree
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e].to(compute_dtype)
                # log_softmax upcasts inside its one kernel: no separate fp32 copy of the logits,
                # and ce = lse - logit[target] = -logp[target], computed as F.cross_entropy does.
                logp = torch.log_softmax(h @ w.T, dim=-1, dtype=acc_dtype)
                ce[s:e] = logp.gather(1, targets[s:e, None]).squeeze(1).neg_()
                if not (need_hidden or need_weight):
                    continue
                p = logp.exp_()  # the softmax
                p.scatter_add_(1, targets[s:e, None], p.new_full((e - s, 1), -1.0))
                if compute_dtype == acc_dtype:
                    g = p.mul_(coef[s:e, None])
                else:  # scaled and cast in one pass
                    g = torch.mul(p, coef[s:e, None], out=torch.empty(p.shape, dtype=compute_dtype, device=p.device))
                    del p, logp
                if grad_hidden is not None:
                    grad_hidden[s:e] = g @ w
                if grad_weight is not None:
                    if g.dtype == acc_dtype:
                        grad_weight.addmm_(g.T, h)
                    else:  # a low-precision matmul like nn.Linear's backward, summed over chunks in fp32
                        grad_weight += g.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.consumed = False
        ctx.mark_non_differentiable(ce)
        return (coef * ce).sum(), ce

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_objective: Tensor, grad_ce: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # Scaling the saved gradients in place spares a [V, d] fp32 copy, at the price of
        # retain_graph (torch's own chunked linear cross-entropy makes the same trade by default).
        if ctx.consumed:
            raise RuntimeError(
                "linear_token_cross_entropy's backward scales its precomputed gradients in place, so it "
                "runs once: a second backward through it (retain_graph=True) is not supported"
            )
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        gh = None if grad_hidden is None else grad_hidden.mul_(grad_objective).to(hidden_dtype)
        gw = None if grad_weight is None else grad_weight.mul_(grad_objective).to(weight_dtype)
        return gh, gw, None, None, None, None, None


def linear_token_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, coef: Tensor, *, chunk_bytes: int = CHUNK_BYTES,
    min_chunk_rows: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``(objective_sum, ce)``: ``sum_i coef_i * ce_i`` and the per-row cross-entropy ``ce`` of the
    logits ``hidden @ weight.T``, without ever holding those logits or their gradient at full size.

    Args:
        hidden: ``[N, d]`` final hidden states of the rows that carry loss (any float dtype).
        weight: ``[V, d]`` the LM's output-embedding (lm_head) weight; its gradient is computed
            only when it requires grad.
        targets: ``[N]`` token ids in ``[0, V)``.
        coef: ``[N]`` per-row coefficients, never differentiated: the effective token weights of
            a scheme (:func:`effective_weights`), 1 for NTP, 0 to drop a row.
        chunk_bytes: size of one chunk of rows of fp32 logits (see ``CHUNK_BYTES``). Each chunk
            also reads and writes the whole ``[V, d]`` fp32 weight-gradient accumulator once, a
            cost that does not shrink with the chunk: fewer, larger chunks trade memory for time.
        min_chunk_rows: the fewest rows of a chunk whatever ``chunk_bytes`` says. The
            weight-gradient product of a chunk does about ``rows / 4`` FLOPs per byte of that
            accumulator it moves, so a GPU needs several hundred rows to stay compute-bound;
            1024 rows at a 128k vocabulary are 512 MiB of fp32 logits.

    The logits are computed as ``nn.Linear`` would: in autocast's dtype when autocast is on
    (fp64 excepted, as autocast does), in ``hidden``'s dtype otherwise (the weight is cast to it),
    so they round like the logits path's; softmax and cross-entropy are then computed in fp32
    (fp64 for fp64 inputs). ``objective_sum`` is a scalar of that dtype, differentiable w.r.t.
    ``hidden`` and ``weight``; ``ce`` ``[N]`` is detached. The gradients are computed during the
    forward call, and only when grad mode is on (under ``torch.no_grad`` this is a chunked
    cross-entropy): the extra memory is the ``[V, d]`` weight gradient in fp32 (and one
    low-precision ``[V, d]`` product per chunk), ``[N, d]`` for the hidden states' and a few
    chunks of logits. Backward runs once (no ``retain_graph``). Plain ``hidden @ weight.T`` only:
    no head bias, logit scale or soft-capping.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [N, d] and weight {tuple(weight.shape)} [V, d] with one d"
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be float tensors, got {hidden.dtype} and {weight.dtype}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n,) or coef.shape != (n,):
        raise ValueError(
            f"targets {tuple(targets.shape)} and coef {tuple(coef.shape)} must both be [N] = ({n},), "
            "one per row of hidden"
        )
    tgt = targets.long()
    if n and bool(((tgt < 0) | (tgt >= vocab)).any()):
        bad = tgt[(tgt < 0) | (tgt >= vocab)][:5].tolist()
        raise ValueError(
            f"targets must lie in [0, {vocab}), found {bad}: pass only the rows that carry loss "
            "(an ignore index or a pad id here means the rows and the loss mask are misaligned)"
        )
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = hidden.dtype
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)
    chunk = max(1, chunk_bytes // (vocab * acc_dtype.itemsize), min_chunk_rows)
    return _LinearCrossEntropy.apply(
        hidden, weight, tgt, coef.detach(), chunk, compute_dtype, torch.is_grad_enabled()
    )


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

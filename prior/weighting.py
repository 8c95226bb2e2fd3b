"""Token-weighting schemes: the one owner of the weights the stage-3 loss applies.

A scheme turns what a training step knows about each caption token into raw weights ``[B, T]``;
:func:`prior.loss.effective_weights` then normalises them per caption (``k * w / sum w`` over
the caption's loss tokens) or over the batch (``n * w / sum w`` over all loss tokens of the
micro-batch, i.e. a loss of ``sum(w * ce) / sum(w)``), and the loss is the token mean of the
effective weight times the cross-entropy. Weights never carry gradient.

Entries (``loss.name``) and their raw weights, per token ``t`` with LVLM cross-entropy ``ce``:

``ntp``
    none (every token weighs 1).
``prior`` / ``prior_online``
    ``floor + (1 - floor) * (1 - P_ref(t)) ** alpha`` from the text-only reference LM's
    log-probabilities: stage-2 sidecars, or (``prior_online``, or any scheme with
    ``reference`` set) the frozen reference scoring the batch inside the step.
``rho``
    selective LM (Rho-1): excess loss ``ce - ce_ref`` per token; the top ``frac`` of the
    batch's loss tokens get 1, the rest 0; normalised over the batch (mean over kept tokens).
``cal``
    contrastive alignment (CAL): ``clamp(logit_img(t) - logit_noimg(t), lo, hi)`` from the LVLM's
    own target logit with and without the image (a second, no-grad pass on the caption alone),
    averaged over a window of ``smooth`` positions, normalised over the batch.
``dpa``
    DPA: ``clamp(p_img(t) - p_proxy(t), lo, hi)`` with the LVLM's own probability of the token
    and the text-only reference's (the proxy), smoothed and normalised over the batch.
``oracle``
    the demo corpus's ground truth: ``floor + (1 - floor) * [t is a visual word]`` from the spans
    of each sample's json (shape and colour words, ``prior.demo.token_kinds``).

Every scheme accepts ``normalise`` (``caption`` or ``batch``) and ``smooth`` (an odd window
width; 1 = none); smoothing averages a token's weight with its neighbours' inside the same
caption's loss tokens. "Batch" is the micro-batch a rank sees, as in the schemes' own code.

:func:`build_weighting` reads a ``loss`` config; :meth:`Weighting.needs` says what a step must
provide (:data:`NEEDS`), and ``needs_sidecars`` whether the data must carry stage-2 weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prior.loss import NORMALISATIONS, effective_weights, token_weights

__all__ = ["NEEDS", "SCHEMES", "WeightInputs", "Weighting", "build_weighting", "smooth_weights"]

NEEDS = ("model", "reference", "text_only", "visual")
"""What a scheme may need: ``model`` (the LVLM's own cross-entropy, with the image),
``reference`` (the text-only reference LM's log-probabilities of the caption tokens),
``text_only`` (the LVLM's target logits with the image and with it hidden) and ``visual``
(ground-truth visual-word flags from the samples' json). Schemes that need neither ``model`` nor
``text_only`` can be computed without the LVLM (``Weighting.needs_lvlm``), e.g. by the
weights report."""


@dataclass
class WeightInputs:
    """What a training step knows about each caption token, ``[B, T]`` aligned with the targets.

    Only ``loss_mask`` is always set; the rest are filled when the scheme needs them.
    """

    loss_mask: Tensor
    """bool, True on the tokens that carry loss."""
    ce: Tensor | None = None
    """the LVLM's cross-entropy of each token (with the image), detached."""
    target_logits: Tensor | None = None
    """the LVLM's logit of each target token (with the image), detached."""
    ref_logprobs: Tensor | None = None
    """the text-only reference LM's log-probability of each token."""
    text_target_logits: Tensor | None = None
    """the LVLM's logit of each target token with the image hidden (the caption alone)."""
    visual: Tensor | None = None
    """bool, True on the tokens that are visual words."""


@dataclass(frozen=True)
class Scheme:
    """A registry entry: its raw-weight function, what it needs, and its knobs with defaults."""

    name: str
    raw: Callable[[WeightInputs, Mapping[str, Any]], Tensor | None]
    needs: frozenset[str]
    knobs: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


def _need(value: Tensor | None, what: str, scheme: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss={scheme} needs {what} in WeightInputs; the training step did not provide it")
    return value


def _no_weights(x: WeightInputs, k: Mapping[str, Any]) -> None:
    """NTP: no weights (a named function, so a weighting pickles into ddp_spawn processes)."""
    return None


def _prior(x: WeightInputs, k: Mapping[str, Any]) -> Tensor:
    w = token_weights(_need(x.ref_logprobs, "ref_logprobs", "prior"), k["alpha"])
    return _floored(w, k["floor"])


def _floored(w: Tensor, floor: float) -> Tensor:
    return w if floor == 0 else floor + (1.0 - floor) * w


def _rho(x: WeightInputs, k: Mapping[str, Any]) -> Tensor:
    ref = _need(x.ref_logprobs, "ref_logprobs", "rho").detach().float()
    excess = _need(x.ce, "ce", "rho").detach().float() + ref  # ce_model - ce_ref, with ce_ref = -log P_ref
    n = int(x.loss_mask.sum())
    keep = torch.zeros_like(excess)
    if n:
        top = max(1, math.ceil(k["frac"] * n))
        scores = excess[x.loss_mask]
        chosen = torch.zeros(n, device=excess.device)
        chosen[scores.topk(top).indices] = 1.0
        keep[x.loss_mask] = chosen
    return keep


def _cal(x: WeightInputs, k: Mapping[str, Any]) -> Tensor:
    img = _need(x.target_logits, "target_logits", "cal").detach().float()
    noimg = _need(x.text_target_logits, "text_target_logits", "cal").detach().float()
    return (img - noimg).clamp(k["clamp_min"], k["clamp_max"])


def _dpa(x: WeightInputs, k: Mapping[str, Any]) -> Tensor:
    p_img = torch.exp(-_need(x.ce, "ce", "dpa").detach().float())
    p_proxy = _need(x.ref_logprobs, "ref_logprobs", "dpa").detach().float().exp()
    return (p_img - p_proxy).clamp(k["clamp_min"], k["clamp_max"])


def _oracle(x: WeightInputs, k: Mapping[str, Any]) -> Tensor:
    return _floored(_need(x.visual, "visual", "oracle").float(), k["floor"])


_COMMON = {"normalise": "caption", "smooth": 1}
_REF = {**_COMMON, "reference": None}

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("ntp", _no_weights, frozenset(), dict(_COMMON), "plain next-token prediction"),
        Scheme("prior", _prior, frozenset({"reference"}), {**_REF, "alpha": 1.0, "floor": 0.0},
               "(1 - P_ref) ** alpha from the stage-2 sidecars"),
        Scheme("prior_online", _prior, frozenset({"reference"}), {**_REF, "alpha": 1.0, "floor": 0.0},
               "(1 - P_ref) ** alpha from the reference LM run inside the step"),
        Scheme("rho", _rho, frozenset({"model", "reference"}), {**_REF, "normalise": "batch", "frac": 0.6},
               "top frac of tokens by excess loss ce - ce_ref (Rho-1)"),
        Scheme("cal", _cal, frozenset({"model", "text_only"}),
               {**_COMMON, "normalise": "batch", "smooth": 3, "clamp_min": 1.0, "clamp_max": 5.0},
               "clamp(logit_img - logit_noimg) (CAL)"),
        Scheme("dpa", _dpa, frozenset({"model", "reference"}),
               {**_REF, "normalise": "batch", "smooth": 3, "clamp_min": 0.05, "clamp_max": 0.5},
               "clamp(p_img - p_proxy) (DPA)"),
        Scheme("oracle", _oracle, frozenset({"visual"}), {**_COMMON, "floor": 0.0},
               "1 on ground-truth visual words, floor elsewhere (demo corpus)"),
    )
}


def smooth_weights(weights: Tensor, loss_mask: Tensor, width: int) -> Tensor:
    """Each loss token's weight averaged over the ``width`` positions centred on it, counting only
    loss tokens of the same caption; 0 off the mask. ``width`` 1 returns the weights as they are."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"smooth must be an odd window width >= 1, got {width}")
    w = torch.where(loss_mask, weights.float(), 0.0)
    if width == 1:
        return w
    kernel = w.new_ones(1, 1, width)
    total = F.conv1d(w[:, None], kernel, padding=width // 2)[:, 0]
    count = F.conv1d(loss_mask.float()[:, None], kernel, padding=width // 2)[:, 0]
    return torch.where(loss_mask, total / count.clamp(min=1.0), 0.0)


@dataclass(frozen=True)
class Weighting:
    """One scheme with its knobs, built by :func:`build_weighting` from a ``loss`` config."""

    scheme: Scheme
    knobs: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.scheme.name

    @property
    def normalise(self) -> str:
        return self.knobs["normalise"]

    @property
    def reference(self) -> str | None:
        """The reference LM folder to run inside the step, or None (sidecars, or not needed)."""
        return self.knobs.get("reference")

    @property
    def needs(self) -> frozenset[str]:
        return self.scheme.needs

    @property
    def needs_lvlm(self) -> bool:
        """Whether the weights depend on the LVLM being trained (its own predictions)."""
        return bool({"model", "text_only"} & self.needs)

    @property
    def needs_sidecars(self) -> bool:
        """Whether the batches must carry stage-2 reference log-probabilities (``ref_logprobs``)."""
        return "reference" in self.needs and self.reference is None

    def raw_weights(self, inputs: WeightInputs) -> Tensor | None:
        """The scheme's weights ``[B, T]`` (fp32, 0 off the mask, smoothed), or None for NTP."""
        w = self.scheme.raw(inputs, self.knobs)
        if w is None:
            return None
        return smooth_weights(w.detach(), inputs.loss_mask, self.knobs["smooth"])

    def effective(self, weights: Tensor | None, loss_mask: Tensor) -> Tensor:
        """What each token's cross-entropy is multiplied by (see :func:`prior.loss.effective_weights`)."""
        if weights is None:
            return loss_mask.float()
        return effective_weights(weights, loss_mask, normalise=self.normalise)


def build_weighting(loss: Mapping[str, Any]) -> Weighting:
    """The :class:`Weighting` a ``loss`` config (``name`` plus knobs) describes, knobs checked."""
    cfg = dict(loss)
    name = cfg.pop("name", None)
    if name not in SCHEMES:
        raise ValueError(f"Unknown loss {name!r}: choose one of {sorted(SCHEMES)} (`loss=...`).")
    scheme = SCHEMES[name]
    unknown = sorted(set(cfg) - set(scheme.knobs))
    if unknown:
        raise ValueError(f"loss={name} has no knob(s) {unknown}; its knobs are {sorted(scheme.knobs)}.")
    knobs = {**scheme.knobs, **cfg}
    if name == "prior_online" and not knobs["reference"]:
        raise ValueError("loss=prior_online needs `loss.reference`: the reference LM folder from stage 1.")
    _check_knobs(name, knobs)
    return Weighting(scheme, knobs)


def _check_knobs(name: str, k: dict[str, Any]) -> None:
    if k["normalise"] not in NORMALISATIONS:
        raise ValueError(f"loss.normalise must be one of {NORMALISATIONS}, got {k['normalise']!r}")
    if not isinstance(k["smooth"], int) or k["smooth"] < 1 or k["smooth"] % 2 == 0:
        raise ValueError(f"loss.smooth must be an odd window width >= 1, got {k['smooth']!r}")
    if "alpha" in k and not k["alpha"] >= 0:
        raise ValueError(f"loss.alpha must be >= 0, got {k['alpha']}")
    if "floor" in k and not 0 <= k["floor"] <= 1:
        raise ValueError(f"loss.floor must lie in [0, 1], got {k['floor']}")
    if "frac" in k and not 0 < k["frac"] <= 1:
        raise ValueError(f"loss.frac (share of tokens kept) must lie in (0, 1], got {k['frac']}")
    if "clamp_min" in k and not k["clamp_min"] <= k["clamp_max"]:
        raise ValueError(f"loss={name}: clamp_min {k['clamp_min']} > clamp_max {k['clamp_max']}")
    if "clamp_min" in k and k["clamp_max"] <= 0:
        raise ValueError(f"loss={name}: clamp_max must be > 0 or every weight is 0, got {k['clamp_max']}")

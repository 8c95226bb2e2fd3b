"""The token-weighting registry: every scheme against a straightforward float64 implementation of
its formula, the normalisations, and the configs that select them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prior.loss import effective_weights, prior_loss, token_cross_entropy
from prior.weighting import SCHEMES, WeightInputs, build_weighting, smooth_weights

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"

# Two captions of different length: 4 and 2 loss tokens (row 1 is padded).
MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])
P_REF = [[0.9, 0.5, 0.2, 0.0], [0.75, 0.1, 0.3, 0.3]]  # reference probabilities (padding: garbage)


def ref_logprobs() -> torch.Tensor:
    return torch.tensor(P_REF, dtype=torch.float64).log()


# ----------------------------------------------------------------- float64 reference implementations


def loss_of(ce: list[list[float]], w: list[list[float]], mask: torch.Tensor, normalise: str) -> float:
    """sum over loss tokens of normalised weight x ce, divided by the number of loss tokens."""
    rows = [[(c, x) for c, x, m in zip(ce_r, w_r, m_r, strict=True) if m] for ce_r, w_r, m_r in
            zip(ce, w, mask.tolist(), strict=True)]
    n = sum(len(r) for r in rows)
    if normalise == "caption":
        total = 0.0
        for r in rows:
            s = sum(x for _, x in r)
            total += sum(c * (len(r) * x / s if s > 0 else 1.0) for c, x in r)
        return total / n
    s = sum(x for r in rows for _, x in r)
    return sum(c * (n * x / s if s > 0 else 1.0) for r in rows for c, x in r) / n


def smooth3(w: list[float], m: list[bool]) -> list[float]:
    """Average over the loss tokens among each position and its two neighbours."""
    out = []
    for i, on in enumerate(m):
        window = [w[j] for j in (i - 1, i, i + 1) if 0 <= j < len(w) and m[j]]
        out.append(sum(window) / len(window) if on else 0.0)
    return out


def close(t: torch.Tensor, expected: list) -> bool:
    return torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def registry_loss(weighting, inputs: WeightInputs, ce: torch.Tensor) -> float:
    w = weighting.raw_weights(inputs)
    return float((weighting.effective(w, inputs.loss_mask).double() * ce).sum() / inputs.loss_mask.sum())


CE = torch.tensor([[0.5, 1.0, 2.0, 4.0], [3.0, 1.5, 9.0, 9.0]], dtype=torch.float64)


# ----------------------------------------------------------------- formulas


def test_prior_alpha_and_floor_match_their_formula_by_hand():
    weighting = build_weighting({"name": "prior", "alpha": 0.5, "floor": 0.2})
    w = weighting.raw_weights(WeightInputs(MASK, ref_logprobs=ref_logprobs()))
    # 0.2 + 0.8 * (1 - p) ** 0.5, e.g. p = 0.75 -> 0.2 + 0.8 * 0.5 = 0.6
    expected = [[0.2 + 0.8 * (1 - p) ** 0.5 for p in row] for row in P_REF]
    expected[1][2:] = [0.0, 0.0]
    assert torch.allclose(w.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert w[1, 0].item() == pytest.approx(0.6)
    assert loss_of(CE.tolist(), expected, MASK, "caption") == pytest.approx(
        registry_loss(weighting, WeightInputs(MASK, ref_logprobs=ref_logprobs()), CE), rel=1e-6)


def test_rho_keeps_the_top_fraction_of_excess_loss_and_averages_them():
    weighting = build_weighting({"name": "rho", "frac": 0.5})
    ref = ref_logprobs()
    inputs = WeightInputs(MASK, ce=CE, ref_logprobs=ref)
    w = weighting.raw_weights(inputs)
    # excess = ce + log p_ref over the 6 loss tokens; keep ceil(0.5 * 6) = 3 largest
    excess = [(CE[i, j].item() + ref[i, j].item(), (i, j)) for i in range(2) for j in range(4) if MASK[i, j]]
    kept = {pos for _, pos in sorted(excess, reverse=True)[:3]}
    assert {(i, j) for i in range(2) for j in range(4) if w[i, j] == 1} == kept
    assert float(w.sum()) == 3
    mean_kept = sum(CE[i, j].item() for i, j in kept) / 3
    assert registry_loss(weighting, inputs, CE) == pytest.approx(mean_kept, rel=1e-6)


def test_cal_clamps_the_logit_gain_smooths_and_normalises_over_the_batch():
    weighting = build_weighting({"name": "cal"})  # clamp [1, 5], width 3, batch
    img = torch.tensor([[3.0, 9.0, 0.0, 2.5], [1.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    noimg = torch.tensor([[1.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    inputs = WeightInputs(MASK, ce=CE, target_logits=img, text_target_logits=noimg)
    clamped = [[min(max(a - b, 1.0), 5.0) for a, b in zip(r1, r2, strict=True)] for r1, r2 in
               zip(img.tolist(), noimg.tolist(), strict=True)]
    assert clamped[0] == [2.0, 5.0, 1.0, 2.5]
    expected = [smooth3(r, m) for r, m in zip(clamped, MASK.tolist(), strict=True)]
    assert expected[0] == pytest.approx([3.5, 8 / 3, 8.5 / 3, 1.75]) and expected[1][:2] == [2.0, 2.0]
    w = weighting.raw_weights(inputs)
    assert torch.allclose(w.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert registry_loss(weighting, inputs, CE) == pytest.approx(loss_of(CE.tolist(), expected, MASK, "batch"), rel=1e-6)


def test_dpa_clamps_the_probability_gain_over_the_proxy():
    weighting = build_weighting({"name": "dpa", "smooth": 1})
    ce = -torch.tensor([[0.95, 0.9, 0.25, 0.5], [0.8, 0.2, 0.5, 0.5]], dtype=torch.float64).log()
    inputs = WeightInputs(MASK, ce=ce, ref_logprobs=ref_logprobs())
    # p_img - p_proxy: 0.05, 0.4, 0.05, 0.5 | 0.05, 0.1 after clamping to [0.05, 0.5]
    expected = [[0.05, 0.4, 0.05, 0.5], [0.05, 0.1, 0.0, 0.0]]
    assert torch.allclose(weighting.raw_weights(inputs).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert registry_loss(weighting, inputs, ce) == pytest.approx(loss_of(ce.tolist(), expected, MASK, "batch"), rel=1e-6)
    smoothed = build_weighting({"name": "dpa"}).raw_weights(inputs)  # width 3 by default
    assert smoothed[0].tolist() == pytest.approx(smooth3(expected[0], [True] * 4))


def test_oracle_weighs_the_visual_words_and_floors_the_rest():
    visual = torch.tensor([[False, True, True, False], [True, False, False, False]])
    w = build_weighting({"name": "oracle", "floor": 0.1}).raw_weights(WeightInputs(MASK, visual=visual))
    assert close(w, [[0.1, 1.0, 1.0, 0.1], [1.0, 0.1, 0.0, 0.0]])


def test_smoothing_stays_inside_each_caption():
    w = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert close(smooth_weights(w, mask, 3), [[1.5, 2.0, 2.5, 0.0]])
    assert close(smooth_weights(w, mask, 5), [[2.0, 2.0, 2.0, 0.0]])
    with pytest.raises(ValueError, match="odd"):
        smooth_weights(w, mask, 2)


# ----------------------------------------------------------------- normalisation and safety


def test_batch_and_caption_normalisation_differ_on_captions_of_different_length():
    w = torch.tensor([[1.0, 1.0, 1.0, 3.0], [1.0, 3.0, 0.0, 0.0]])
    # caption: row 0 -> 4 * w / 6, row 1 -> 2 * w / 4; batch: 6 * w / 10
    caption = effective_weights(w, MASK, "caption")
    batch = effective_weights(w, MASK, "batch")
    assert close(caption, [[2 / 3, 2 / 3, 2 / 3, 2.0], [0.5, 1.5, 0.0, 0.0]])
    assert close(batch, [[0.6, 0.6, 0.6, 1.8], [0.6, 1.8, 0.0, 0.0]])
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 4))
    ce = token_cross_entropy(logits, targets, MASK).tolist()
    for norm in ("caption", "batch"):
        got = prior_loss(logits, targets, w, MASK, normalise=norm)
        assert float(got) == pytest.approx(loss_of(ce, w.tolist(), MASK, norm), rel=1e-6)  # fp32 weights
    assert not math.isclose(float(prior_loss(logits, targets, w, MASK, normalise="caption")),
                            float(prior_loss(logits, targets, w, MASK, normalise="batch")), rel_tol=1e-3)


def test_zero_weights_fall_back_to_uniform_per_normalisation_group():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    assert effective_weights(w, MASK, "caption")[0].tolist() == [1.0] * 4  # the zero caption: uniform
    batch = effective_weights(w, MASK, "batch")
    assert batch[0].tolist() == [0.0] * 4 and batch[1, :2].tolist() == pytest.approx([1.5, 4.5])
    assert effective_weights(torch.zeros(2, 4), MASK, "batch").tolist() == MASK.float().tolist()


@pytest.mark.parametrize("name", ["prior", "rho", "cal", "dpa", "oracle"])
def test_weights_carry_no_gradient_and_ignore_masked_positions(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 4))
    garbage = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("nan"), float("inf")]], dtype=torch.float64)

    def inputs(noise: torch.Tensor) -> tuple[WeightInputs, torch.Tensor]:
        ce = token_cross_entropy(logits, targets, MASK)
        gathered = logits.gather(-1, targets[..., None]).squeeze(-1)
        return WeightInputs(
            MASK, ce=ce, target_logits=gathered + noise, ref_logprobs=ref_logprobs() + noise,
            text_target_logits=gathered - 2.0 + noise, visual=torch.tensor([[True, False] * 2] * 2),
        ), ce

    weighting = build_weighting({"name": name})
    x, ce = inputs(torch.zeros(2, 4, dtype=torch.float64))
    w = weighting.raw_weights(x)
    assert not w.requires_grad and torch.isfinite(w).all() and (w[~MASK] == 0).all()
    y, _ = inputs(garbage)
    assert torch.equal(weighting.raw_weights(y), w)  # padding values do not leak in
    eff = weighting.effective(w, MASK)
    (eff * ce).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    ce2 = token_cross_entropy(logits, targets, MASK)
    (eff.detach().double() * ce2).sum().backward()  # weights as constants
    assert torch.allclose(got, logits.grad)


# ----------------------------------------------------------------- configs


def test_every_scheme_has_a_config_whose_knobs_are_the_registrys():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(SCHEMES)
    for name, scheme in SCHEMES.items():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        assert cfg.pop("name") == name
        assert set(cfg) == set(scheme.knobs), name
        for key, value in cfg.items():
            if not (isinstance(value, str) and value.startswith("${")):
                assert value == scheme.knobs[key], (name, key)


def test_bad_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown loss 'prio'"):
        build_weighting({"name": "prio"})
    with pytest.raises(ValueError, match=r"loss=cal has no knob\(s\) \['alpha'\]"):
        build_weighting({"name": "cal", "alpha": 0.5})
    for bad in ({"normalise": "token"}, {"smooth": 2}, {"alpha": -1.0}, {"floor": 1.5}):
        with pytest.raises(ValueError, match=f"loss.{next(iter(bad))}"):
            build_weighting({"name": "prior", **bad})
    with pytest.raises(ValueError, match="frac"):
        build_weighting({"name": "rho", "frac": 0.0})
    with pytest.raises(ValueError, match="clamp_min"):
        build_weighting({"name": "dpa", "clamp_min": 0.6})
    with pytest.raises(ValueError, match="loss.reference"):
        build_weighting({"name": "prior_online", "reference": None})


def test_what_each_scheme_needs_decides_the_data():
    sidecars = {n for n in SCHEMES if build_weighting({"name": n, **({"reference": "r"} if n == "prior_online" else {})}).needs_sidecars}
    assert sidecars == {"prior", "rho", "dpa"}
    assert not build_weighting({"name": "prior", "reference": "/some/reference"}).needs_sidecars
    assert {n for n in SCHEMES if build_weighting({"name": n, "reference": "r"} if n == "prior_online" else {"name": n}).needs_lvlm} == {"rho", "cal", "dpa"}

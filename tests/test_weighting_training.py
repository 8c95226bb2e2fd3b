"""The weighting schemes inside stage 3: what each step provides them, the data they need, and
the callbacks and report showing the weights the loss uses."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.utils import instantiate

from prior.callbacks import SampleTable
from prior.cli.common import build_datamodule
from prior.data.tokenization import load_tokenizer
from prior.eval.token_weights import apply_weighting, scored_samples
from prior.loss import token_cross_entropy, token_weights
from prior.weighting import SCHEMES, build_weighting
from tests.test_lvlm_training import first_batch, lvlm_cfg


@pytest.mark.parametrize("backbone", ["encoder_free", "visual_encoder"])
@pytest.mark.parametrize("loss", sorted(SCHEMES))
def test_every_scheme_gives_a_finite_weighted_loss_with_gradients(demo, loss, backbone):
    cfg = lvlm_cfg(demo, f"loss={loss}", backbone=backbone)
    dm, batch = first_batch(cfg)
    assert dm.with_weights == (loss in ("prior", "rho", "dpa"))  # follows from the scheme
    module = instantiate(cfg.model, _recursive_=False)
    r = module._losses(batch)
    assert torch.isfinite(r["objective_sum"])
    r["objective_sum"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    if loss == "ntp":
        assert "weights" not in r and torch.equal(r["objective_sum"], r["ntp_sum"])
        return
    w = r["weights"]
    assert not w.requires_grad and (w[~r["mask"]] == 0).all() and float(w.sum()) > 0
    if loss in ("cal", "dpa"):  # an untrained model gains nothing from the image: all at clamp_min
        assert torch.allclose(w[r["mask"]], torch.tensor(module.weighting.knobs["clamp_min"]))
    else:
        assert not torch.allclose(r["objective_sum"], r["ntp_sum"])


def test_the_text_only_pass_is_the_lvlm_with_every_image_token_hidden(demo):
    cfg = lvlm_cfg(demo, "loss=cal")
    _, batch = first_batch(cfg)
    lvlm = instantiate(cfg.model, _recursive_=False).model.eval()
    ids, attn = batch["input_ids"][:4], batch["attention_mask"][:4]
    text = lvlm.text_only(ids, attn)
    backbone = lvlm.backbone
    forward = backbone.forward
    backbone.forward = lambda images, image_mask=None: (  # type: ignore[method-assign]
        (out := forward(images, image_mask))[0], torch.zeros_like(out[1]))
    hidden = lvlm(batch["images"][:4], ids, attn)
    backbone.forward = forward  # type: ignore[method-assign]
    seen = lvlm(batch["images"][:4], ids, attn)
    mask = text.loss_mask
    assert torch.allclose(text.logits[mask], hidden.logits[mask], atol=1e-4)
    assert not torch.allclose(text.logits[mask], seen.logits[mask], atol=1e-3)


def test_cal_weighs_by_the_gain_of_the_image_on_the_target_logit(demo):
    cfg = lvlm_cfg(demo, "loss=cal", "loss.smooth=1", "loss.clamp_min=-100.0", "loss.clamp_max=100.0")
    _, batch = first_batch(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    with torch.no_grad():
        w = module.token_weights(batch)
        out = module.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        text = module.model.text_only(batch["input_ids"], batch["attention_mask"])
    mask = out.loss_mask
    gain = (out.logits.gather(-1, out.targets[..., None]) - text.logits.gather(-1, out.targets[..., None])).squeeze(-1)
    assert torch.allclose(w[mask], gain[mask], atol=1e-4)


def test_rho_and_dpa_use_the_models_own_predictions_and_the_sidecars(demo):
    cfg = lvlm_cfg(demo, "loss=dpa", "loss.smooth=1", "loss.clamp_min=-1.0", "loss.clamp_max=1.0")
    _, batch = first_batch(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    with torch.no_grad():
        w = module.token_weights(batch)
        out = module.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        p_img = (-token_cross_entropy(out.logits, out.targets, out.loss_mask)).exp()
    mask = out.loss_mask
    assert torch.allclose(w[mask], (p_img - batch["ref_logprobs"].exp())[mask], atol=1e-5)
    module.weighting = build_weighting({"name": "rho", "frac": 0.25})
    kept = module.token_weights(batch)
    assert int(kept.sum()) == -(-int(mask.sum()) // 4) and set(kept[mask].unique().tolist()) == {0.0, 1.0}


def test_oracle_flags_exactly_the_visual_words_of_the_json(demo):
    cfg = lvlm_cfg(demo, "loss=oracle")
    _, batch = first_batch(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    w = module.token_weights(batch)
    tok = module.tokenizer
    for i in range(4):
        meta = batch["meta"][i]
        n = int(batch["attention_mask"][i].sum()) - 1
        flagged = tok.decode(batch["input_ids"][i, 1 : n + 1][w[i, :n] == 1]).split()
        visual_words = " ".join(s["text"] for s in meta["spans"] if s["cls"] == "visual").split()
        assert flagged and sorted(flagged) == sorted(visual_words)
        assert {o[k] for o in meta["objects"] for k in ("color", "shape")} <= set(flagged)
        assert (w[i, :n][w[i, :n] != 1] == 0).all()  # floor 0 elsewhere


def test_the_sample_table_shows_the_weights_the_loss_uses(demo):
    cfg = lvlm_cfg(demo, "loss=prior", "loss.alpha=0.5", "loss.floor=0.2")
    _, batch = first_batch(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    rows = SampleTable(num_samples=2, max_new_tokens=3).rows(module, batch)
    assert len(rows) == 2
    shown = [float(x) for x in re.findall(r'title="([0-9.]+)"', rows[0][1])]
    n = int(batch["attention_mask"][0].sum()) - 1
    expected = 0.2 + 0.8 * token_weights(batch["ref_logprobs"][0, :n], alpha=0.5)
    assert shown == pytest.approx(expected.tolist(), abs=0.006)  # shown with 2 decimals
    assert shown != pytest.approx(token_weights(batch["ref_logprobs"][0, :n]).tolist(), abs=0.006)


def test_the_weights_report_honours_the_loss_knobs(demo):
    samples = list(scored_samples(str(demo.data / "val"), load_tokenizer(demo.tokenizer), None, 80, 8))
    sidecar = [s["weights"].copy() for s in samples]
    shown = apply_weighting(samples, build_weighting({"name": "prior", "alpha": 0.5}), load_tokenizer(demo.tokenizer),
                            lambda *a: [()] * a[-1])
    for before, s in zip(sidecar, shown, strict=True):
        assert s["weights"] == pytest.approx(before**0.5, abs=1e-5)
    with pytest.raises(ValueError, match="loss=cal weighs tokens by the LVLM's own predictions"):
        apply_weighting(shown, build_weighting({"name": "cal"}), None, None)


def test_stage_three_reads_sidecars_only_when_the_scheme_needs_them(demo):
    for loss, expected in (("ntp", False), ("prior", True), ("prior_online", False), ("cal", False), ("rho", True)):
        assert build_datamodule(lvlm_cfg(demo, f"loss={loss}")).with_weights is expected
    online = lvlm_cfg(demo, "loss=dpa", f"loss.reference={demo.reference}")
    assert build_datamodule(online).with_weights is False
    _, batch = first_batch(online)
    assert "ref_logprobs" not in batch
    assert torch.isfinite(instantiate(online.model, _recursive_=False)._losses(batch)["objective_sum"])

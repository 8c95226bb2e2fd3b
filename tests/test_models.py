"""The LVLM and its two backbones, built from the real config files with tiny sizes."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import prior
from prior.data.datamodule import collate
from prior.data.tokenization import encode_caption, fingerprint, special_ids, train_bpe_tokenizer
from prior.loss import prior_loss
from prior.models.backbones import BACKBONES, build_backbone
from prior.models.llm import build_llm, llm_config
from prior.models.lvlm import GROUPS, LVLM, apply_freezing, build_lvlm, load_lvlm

CONF = Path(__file__).resolve().parents[1] / "conf"
BACKBONE_NAMES = ["visual_encoder", "encoder_free"]
TINY_LLMS = ["tiny_llama", "tiny_qwen2", "tiny_gpt2"]
CAPTIONS = [
    "stock photo of a circle in red on the left",
    "a square in blue",
    "a star in green on the right and a circle in red",
]
MIXED_SIZES = [(32, 32), (16, 24), (20, 12)]


def conf(group: str, name: str) -> Any:
    return OmegaConf.load(CONF / group / f"{name}.yaml")


@pytest.fixture(scope="session")
def tokenizer():
    texts = CAPTIONS + ["click to enlarge", "user 123 posted on 2024-01-02 for $9.99"]
    return train_bpe_tokenizer(texts * 10, vocab_size=300)


def make(tokenizer, backbone: str = "encoder_free", llm: str = "tiny_llama", seed: int = 0) -> LVLM:
    torch.manual_seed(seed)
    return build_lvlm(conf("backbone", backbone), conf("llm", llm), tokenizer).eval()


def make_batch(tokenizer, sizes=((32, 32),) * 3, captions=CAPTIONS, seed: int = 0) -> dict[str, Any]:
    """A batch as the datamodule's collate builds it (image_mask when the sizes differ)."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        {"key": str(i), "url": "", "caption": c, "meta": {}, "image": torch.rand(3, h, w, generator=g),
         "input_ids": encode_caption(tokenizer, c)}
        for i, ((h, w), c) in enumerate(zip(sizes, captions))
    ]
    return collate(samples, pad_id=special_ids(tokenizer)[2])


def run(model: LVLM, batch: dict[str, Any], **override: Any):
    args = {k: batch.get(k) for k in ("images", "input_ids", "attention_mask", "image_mask")}
    return model(**{**args, **override})


# --- configs ---------------------------------------------------------------------------------


def test_config_groups_follow_the_schema() -> None:
    llm_keys = set(inspect.signature(build_llm).parameters) - {"tokenizer"}
    for path in (CONF / "llm").glob("*.yaml"):
        assert set(OmegaConf.load(path)) == llm_keys, path.name
    for path in (CONF / "backbone").glob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert cfg.name in BACKBONES and set(cfg.train) <= set(GROUPS), path.name


def test_build_backbone_fails_loudly() -> None:
    with pytest.raises(ValueError, match="valid ids are \\['encoder_free', 'visual_encoder'\\]"):
        build_backbone("clip", 64)
    with pytest.raises(ValueError, match="unknown options \\['patch'\\].*patch_size"):
        build_backbone("encoder_free", 64, patch=8)


def test_llm_from_config_without_tokenizer_needs_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_llm(None, model_type="llama", config={"hidden_size": 64})


@pytest.mark.parametrize("llm", ["llama32_3b", "mistral_7b"])
def test_paper_llm_config_only_restates_the_pretrained_config(tmp_path: Path, llm: str) -> None:
    """Loading by name_or_path applies `config` as overrides: every key must be a real field,
    and a preset's values must leave the pretrained config (here saved locally) unchanged."""
    cfg = OmegaConf.to_container(conf("llm", llm))
    built = llm_config(None, model_type=cfg["model_type"], config=cfg["config"])
    built.save_pretrained(tmp_path)
    loaded = llm_config(None, model_type=cfg["model_type"], config=cfg["config"], name_or_path=str(tmp_path))
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in built.to_dict().items() if k != "_name_or_path"
    }
    with pytest.raises(ValueError, match="not fields"):
        llm_config(None, config={"rope_thetaa": 1.0}, name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match="llm.model_type"):
        llm_config(None, model_type="gpt2", name_or_path=str(tmp_path))


# --- forward, token counts, loss mask, alignment --------------------------------------------


@pytest.mark.parametrize("llm", TINY_LLMS)
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_forward_backward(tokenizer, backbone: str, llm: str) -> None:
    model = make(tokenizer, backbone, llm).train()
    batch = make_batch(tokenizer)
    out = run(model, batch)
    b, length = batch["input_ids"].shape
    assert out.logits.shape == (b, length - 1, len(tokenizer))
    assert torch.equal(out.targets, batch["input_ids"][:, 1:])
    assert torch.equal(out.loss_mask, batch["attention_mask"][:, 1:])
    loss = prior_loss(out.logits, out.targets, torch.rand(out.targets.shape), out.loss_mask)
    loss.backward()
    assert torch.isfinite(loss)
    for name, module in model.groups().items():
        if module is not None:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_token_count_matches_num_tokens(tokenizer, backbone: str) -> None:
    model = make(tokenizer, backbone)
    for h, w in [(32, 32), (16, 24), (20, 12), (40, 48)]:
        embeds, token_mask = model.backbone(torch.rand(2, 3, h, w))
        assert embeds.shape == (2, model.backbone.num_tokens(h, w), model.backbone.lm_dim)
        assert token_mask.shape == embeds.shape[:2] and token_mask.all()
    if backbone == "encoder_free":
        assert model.backbone.num_tokens(20, 12) == 3 * (2 + 1)
    else:
        assert model.backbone.num_tokens(40, 48) == 16


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_loss_mask_covers_caption_tokens_only(tokenizer, backbone: str) -> None:
    model = make(tokenizer, backbone)
    batch = make_batch(tokenizer, sizes=MIXED_SIZES)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    out = run(model, batch)
    # One output position per caption id after BOS: no image token or separator is in the output.
    assert out.logits.shape[1] == ids.shape[1] - 1
    lengths = attn.sum(1)
    assert out.loss_mask.sum(1).tolist() == (lengths - 1).tolist()
    assert not out.loss_mask[attn[:, 1:] == 0].any()
    # Other images (so other image tokens) or other ids at padded positions change neither which
    # targets carry loss nor, for the padding, the logits at the loss positions.
    garbage = torch.where(attn, ids, torch.randint_like(ids, len(tokenizer)))
    other = run(model, batch, images=torch.rand_like(batch["images"]), input_ids=garbage)
    assert torch.equal(other.loss_mask, out.loss_mask)
    assert torch.equal(other.targets[out.loss_mask], out.targets[out.loss_mask])
    repadded = run(model, batch, input_ids=garbage)
    torch.testing.assert_close(repadded.logits[out.loss_mask], out.logits[out.loss_mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_logits_at_j_see_exactly_ids_up_to_j(tokenizer, backbone: str) -> None:
    model = make(tokenizer, backbone)
    batch = make_batch(tokenizer, captions=[CAPTIONS[0]] * 3)
    ids = batch["input_ids"]
    out = run(model, batch)
    for j in (0, 3, ids.shape[1] - 3):
        later = ids.clone()
        later[:, j + 1 :] = torch.randint_like(later[:, j + 1 :], len(tokenizer))
        changed = run(model, batch, input_ids=later).logits
        torch.testing.assert_close(changed[:, : j + 1], out.logits[:, : j + 1], rtol=0, atol=1e-5)
        own = ids.clone()
        own[:, j] = (own[:, j] + 1) % len(tokenizer)
        assert not torch.allclose(run(model, batch, input_ids=own).logits[:, j], out.logits[:, j])


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_prior_with_equal_weights_is_ntp(tokenizer, backbone: str) -> None:
    batch = make_batch(tokenizer, sizes=MIXED_SIZES)
    results = []
    for weights in (None, 0.25):
        model = make(tokenizer, backbone).train()
        out = run(model, batch)
        w = None if weights is None else torch.full(out.targets.shape, weights)
        loss = prior_loss(out.logits, out.targets, w, out.loss_mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ntp, ntp_grads), (pri, pri_grads) = results
    assert torch.equal(ntp, pri)
    for name, grad in ntp_grads.items():
        assert torch.equal(pri_grads[name], grad), name


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_mixed_image_sizes_match_each_sample_alone(tokenizer, backbone: str) -> None:
    model = make(tokenizer, backbone)
    batch = make_batch(tokenizer, sizes=MIXED_SIZES)
    assert "image_mask" in batch
    out = run(model, batch)
    for i, (size, caption) in enumerate(zip(MIXED_SIZES, CAPTIONS)):
        single = make_batch(tokenizer, sizes=[size], captions=[caption])
        single["images"] = batch["images"][i : i + 1, :, : size[0], : size[1]]
        alone = run(model, single)
        n = alone.logits.shape[1]
        torch.testing.assert_close(out.logits[i, :n], alone.logits[0], rtol=0, atol=1e-5)


# --- freezing -------------------------------------------------------------------------------


def test_freezing_trains_only_the_listed_groups(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    model = make(tokenizer, "visual_encoder")
    totals = {g: sum(p.numel() for p in m.parameters()) for g, m in model.groups().items()}
    with caplog.at_level(logging.INFO, logger="prior.models.lvlm"):
        counts = apply_freezing(model, ["projector"])
    assert counts == {
        "vision": (0, totals["vision"]), "projector": (totals["projector"],) * 2, "llm": (0, totals["llm"])
    }
    assert [r.getMessage().split()[1] for r in caplog.records] == list(GROUPS)
    model.train()
    assert model.backbone.projector.training
    assert not model.backbone.vision.training and not model.llm.training
    out = run(model, make_batch(tokenizer))
    prior_loss(out.logits, out.targets, None, out.loss_mask).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("backbone.projector."), name
    with pytest.raises(ValueError, match="valid ones are \\['vision', 'projector', 'llm'\\]"):
        apply_freezing(model, ["tower"])
    counts = apply_freezing(model.train(), ["vision", "projector", "llm"])
    assert all(t == total for t, total in counts.values()) and model.llm.training


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("llm", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_generate_is_greedy_and_stops_at_eos(tokenizer, backbone: str, llm: str) -> None:
    model = make(tokenizer, backbone, llm)
    batch = make_batch(tokenizer, sizes=MIXED_SIZES)
    images, image_mask = batch["images"], batch.get("image_mask")
    generated = model.generate(images, max_new_tokens=5, image_mask=image_mask)
    assert len(generated) == 3 and all(isinstance(t, int) for row in generated for t in row)
    bos = model.bos_token_id
    # Each generated token is the argmax of a full (cache-free) forward over the tokens before it.
    for i, row in enumerate(generated):
        assert 0 < len(row) <= 5 and model.eos_token_id not in row
        ids = torch.tensor([[bos, *row, 0]])
        single = {
            "images": images[i : i + 1],
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "image_mask": None if image_mask is None else image_mask[i : i + 1],
        }
        logits = run(model, single).logits
        assert logits[0, : len(row)].argmax(-1).tolist() == row
    # The first token after a prompt is the argmax at the prompt's last position.
    prompt = encode_caption(tokenizer, "a circle in")[1:-1]
    first = [row[0] if row else model.eos_token_id for row in model.generate(images, prompt, 1, image_mask)]
    ids = torch.tensor([[bos, *prompt, 0]] * 3)
    logits = run(model, batch, input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).logits
    assert logits[:, len(prompt)].argmax(-1).tolist() == first
    # Stopping: with EOS set to a token the greedy rows produce, each row ends before its first one.
    model.eos_token_id = generated[0][1]
    stopped = model.generate(images, max_new_tokens=5, image_mask=image_mask)
    assert stopped == [row[: row.index(model.eos_token_id)] if model.eos_token_id in row else row for row in generated]


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "llm"), [("visual_encoder", "tiny_gpt2"), ("encoder_free", "tiny_qwen2")])
def test_save_and_load_give_the_same_model(tokenizer, tmp_path: Path, backbone: str, llm: str) -> None:
    model = make(tokenizer, backbone, llm)
    with torch.no_grad():  # away from any fresh initialisation, so a load that re-inits would fail
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = make_batch(tokenizer, sizes=MIXED_SIZES if backbone == "encoder_free" else ((32, 32),) * 3)
    before = run(model, batch).logits
    generated = model.generate(batch["images"], max_new_tokens=4, image_mask=batch.get("image_mask"))
    model.save_pretrained(tmp_path / "export", tokenizer)
    torch.manual_seed(123)
    for loaded, tok in (load_lvlm(tmp_path / "export"), prior.load(str(tmp_path / "export"))):
        assert fingerprint(tok) == fingerprint(tokenizer) and not loaded.training
        assert torch.equal(run(loaded, batch).logits, before)
        assert loaded.generate(batch["images"], max_new_tokens=4, image_mask=batch.get("image_mask")) == generated


def test_load_rejects_a_folder_without_an_export(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        prior.load(tmp_path)


# --- the paper's architectures, on the meta device -----------------------------------------


@pytest.mark.parametrize(
    ("backbone", "llm", "size", "tokens", "hidden", "billions"),
    [
        ("clip_vit_l_336", "llama32_3b", (336, 336), 24 * 24, 3072, 3.2),
        ("encoder_free_32px", "mistral_7b", (320, 320), 10 * (10 + 1), 4096, 7.2),
    ],
)
def test_paper_architectures_fit_on_the_meta_device(
    backbone: str, llm: str, size: tuple[int, int], tokens: int, hidden: int, billions: float
) -> None:
    backbone_cfg, llm_cfg = conf("backbone", backbone), conf("llm", llm)
    if "pretrained" in backbone_cfg:
        backbone_cfg.pretrained = False
    llm_cfg.name_or_path = None  # the same architecture from its config: no download
    with torch.device("meta"):
        model = build_lvlm(backbone_cfg, {**llm_cfg}, None)
        embeds, token_mask = model.backbone(torch.zeros(1, 3, *size))
    assert model.llm.config.hidden_size == model.backbone.lm_dim == hidden
    assert model.backbone.num_tokens(*size) == tokens
    assert embeds.shape == (1, tokens, hidden) and token_mask.shape == (1, tokens)
    assert next(model.llm.parameters()).is_meta
    assert model.llm.get_input_embeddings().weight.shape[0] == llm_cfg.config.vocab_size
    assert (model.bos_token_id, model.eos_token_id) == (llm_cfg.config.bos_token_id, llm_cfg.config.eos_token_id)
    llm_params = sum(p.numel() for p in model.llm.parameters())
    assert abs(llm_params / 1e9 - billions) < 0.1
    counts = apply_freezing(model, backbone_cfg.train)
    assert {g for g, (t, _) in counts.items() if t} == set(backbone_cfg.train)


def test_a_backbones_image_size_is_for_the_data_and_travels_with_the_model(tokenizer, tmp_path) -> None:
    backbone = conf("backbone", "visual_encoder")
    backbone.image_size = 32
    model = build_lvlm(backbone, conf("llm", "tiny_llama"), tokenizer)
    model.save_pretrained(tmp_path, tokenizer)
    loaded, _ = load_lvlm(tmp_path)
    assert loaded.backbone_cfg["image_size"] == 32  # saved with the export, for its users

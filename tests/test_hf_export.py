"""`prior-export`: tiny LVLMs of both backbones, saved in the project format, exported to plain
transformers classes (Llava, Fuyu), reloaded with transformers alone and compared with
``prior.load``: the same logits over the caption, the same greedy tokens, from a PIL image through
the exported processor on one side and through the project's pipeline on the other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import prior
from prior.data.pipeline import image_to_tensor, resize_image
from prior.data.tokenization import encode_caption, train_bpe_tokenizer
from prior.models.hf_export import EXPORT_FILE, UnmappableError, export_hf
from prior.models.lvlm import build_lvlm
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
CAPTIONS = [
    "stock photo of a circle in red on the left",
    "a square in blue",
    "a star in green on the right and a circle in red",
]
#: A pre-norm timm ViT (CLIP's layout) three blocks deep, read at its penultimate block.
CLIP_TOWER = {
    "timm_name": "vit_base_patch16_clip_224",
    "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2},
    "feature_layer": -2,
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer((CAPTIONS + ["click to enlarge"]) * 10, vocab_size=300)


def save_lvlm(tmp_path: Path, tokenizer, backbone: str, llm: str, preprocessing: dict | None,
              **options: Any) -> Path:
    """A tiny LVLM from the project's config files, saved with ``LVLM.save_pretrained``."""
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "backbone" / f"{backbone}.yaml"), options)
    lvlm = build_lvlm(cfg, OmegaConf.load(CONF / "llm" / f"{llm}.yaml"), tokenizer).eval()
    with torch.no_grad():  # the row separator and projector start near zero: make them count
        for p in lvlm.backbone.projector.parameters():
            p.mul_(20.0)
    lvlm.preprocessing = preprocessing
    folder = tmp_path / "prior_model"
    lvlm.save_pretrained(folder, tokenizer)
    return folder


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def compare(src: Path, out: Path, auto_class, image: Image.Image, resize: str, size: int) -> dict[str, Any]:
    """Assert the export reproduces ``prior.load``'s caption logits and greedy tokens; its info."""
    info = json.loads((out / EXPORT_FILE).read_text())
    lvlm, tokenizer = prior.load(src)
    hf = auto_class.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(hf).__name__ == info["model_class"]
    pixels = image_to_tensor(resize_image(image, size, resize))[None]  # the project's pipeline
    vocab = lvlm.llm.get_input_embeddings().weight.shape[0]
    for caption in CAPTIONS:
        ids = torch.tensor([encode_caption(tokenizer, caption)])
        text = info["prompt"].format(text=tokenizer.decode(ids[0, 1:-1]))
        inputs = processor(images=image, text=text, return_tensors="pt", **info["processor_kwargs"])
        n = ids.shape[1] - 1  # positions BOS .. last caption token
        assert inputs["input_ids"][0, -n:].tolist() == ids[0, :-1].tolist()
        with torch.no_grad():
            ours = lvlm(pixels, ids, torch.ones_like(ids)).logits[0]
            theirs = hf(**inputs).logits[0, -n:]
        assert theirs.shape[-1] == vocab + (1 if info["kind"] == "llava" else 2)
        torch.testing.assert_close(theirs[:, :vocab], ours, atol=1e-4, rtol=1e-4)
    prompt = encode_caption(tokenizer, CAPTIONS[2])[1:4]
    ours = lvlm.generate(pixels, prompt_ids=prompt, max_new_tokens=12)[0]
    inputs = processor(images=image, text=info["prompt"].format(text=tokenizer.decode(prompt)),
                       return_tensors="pt", **info["processor_kwargs"])
    with torch.no_grad():
        generated = hf.generate(**inputs, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = lvlm.eos_token_id
    theirs = generated[: generated.index(eos)] if eos in generated else generated
    assert theirs == ours and len(ours) > 0
    return info


@pytest.mark.parametrize(
    ("llm", "tower"),
    [("tiny_llama", {}), ("tiny_qwen2", CLIP_TOWER)],
    ids=["vit-llama", "clip-qwen2-tied"],
)
def test_visual_encoder_exports_to_llava(tmp_path, tokenizer, llm, tower) -> None:
    src = save_lvlm(tmp_path, tokenizer, "visual_encoder", llm, {"image_size": 32, "resize": "center_crop"}, **tower)
    assert export_hf(src, tmp_path / "hf") == "llava"
    info = compare(src, tmp_path / "hf", AutoModelForImageTextToText, noise_image(32, 32), "center_crop", 32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == ("clip_vision_model" if tower else "vit")
    assert config["vision_config"]["num_hidden_layers"] == 2  # blocks up to the feature block (-2 of 3 for CLIP)
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "default"
    assert info["num_image_tokens"] == 16


def test_llava_processor_carries_the_resize_and_normalisation(tmp_path, tokenizer) -> None:
    """A non-square image, `resize` mode: the PIL backend gives the pipeline's pixels, normalised
    with the tower's mean and std (the model's input), to float precision."""
    src = save_lvlm(tmp_path, tokenizer, "visual_encoder", "tiny_llama", {"image_size": 32, "resize": "resize"})
    export_hf(src, tmp_path / "hf")
    lvlm, _ = prior.load(src)
    image = noise_image(40, 56, seed=1)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    got = processor(images=image, text="<image>", return_tensors="pt", add_special_tokens=False)["pixel_values"]
    expected = (image_to_tensor(resize_image(image, 32, "resize"))[None] - lvlm.backbone.mean) / lvlm.backbone.std
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("llm", ["tiny_llama", "tiny_gpt2"])
def test_encoder_free_exports_to_fuyu(tmp_path, tokenizer, llm) -> None:
    """Also through `prior-export`'s entry point; GPT-2's tied `wte` head is saved untied."""
    from prior.cli.export import run_export

    src = save_lvlm(tmp_path, tokenizer, "encoder_free", llm, {"image_size": 32, "resize": "center_crop"})
    cfg = compose_config("export", tmp_path, [f"model={src}", f"out={tmp_path / 'hf'}"])
    assert run_export(cfg) == "fuyu"
    info = compare(src, tmp_path / "hf", AutoModelForCausalLM, noise_image(32, 32), "center_crop", 32)
    lvlm, _ = prior.load(src)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    # the learned row separator is the |NEWLINE| token's embedding
    newline = hf.get_input_embeddings().weight[info["image_newline_token_id"]]
    torch.testing.assert_close(newline, lvlm.backbone.projector.row_sep.detach())
    assert any("untied copy" in note for note in info["notes"]) == (llm == "tiny_gpt2")


def test_a_part_that_does_not_map_is_refused_or_kept_in_the_project_format(tmp_path, tokenizer) -> None:
    src = save_lvlm(tmp_path, tokenizer, "visual_encoder", "tiny_llama", None, projector_depth=1)
    with pytest.raises(UnmappableError, match=r"projector: projector_depth=1.*linear-GELU-linear"):
        export_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert export_hf(src, tmp_path / "auto", format="auto") == "prior"
    lvlm, _ = prior.load(tmp_path / "auto")  # the project format, loadable as before
    assert not (tmp_path / "auto" / EXPORT_FILE).exists()
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(src, tmp_path / "auto", format="auto")

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from prior.data.datamodule import ImageCaptionDataModule, collate
from prior.data.pipeline import resize_image, to_rgb
from prior.data.shards import resolve_shards
from prior.data.tokenization import train_bpe_tokenizer
from tests.helpers import CAPTION_WORDS, jpg_bytes, png_bytes, write_img2dataset_shards


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([" ".join(CAPTION_WORDS)] * 50, vocab_size=300).save_pretrained(path)
    return str(path)


def make_dm(shards, tokenizer_dir, **kw) -> ImageCaptionDataModule:
    kw.setdefault("batch_size", 4)
    return ImageCaptionDataModule(shards, tokenizer_dir, **kw)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "mode,color",
    [
        ("L", 128),
        ("LA", (128, 255)),
        ("RGBA", (200, 10, 10, 255)),
        ("CMYK", (0, 255, 255, 0)),
        ("I;16", 32896),
        ("I", 128),
        ("F", 128.0),
    ],
)
def test_any_mode_to_rgb(mode, color):
    rgb = to_rgb(Image.new(mode, (8, 6), color))
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    r, g, b = rgb.getpixel((0, 0))
    if mode in ("L", "LA", "I;16", "I", "F"):
        assert r == g == b and abs(r - 128) <= 1
    else:
        assert r > 150 and g < 60 and b < 60


def test_palette_and_alpha_composite_over_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    assert to_rgb(p).getpixel((0, 0)) == (255, 0, 0)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode,expected", [("center_crop", (32, 32)), ("resize", (32, 32)), ("pad", (32, 32)), ("none", (32, 24))])
def test_resize_policies(mode, expected):
    assert resize_image(Image.new("RGB", (64, 48)), 32, mode).size == expected


def test_collate_pads_captions_and_images():
    samples = [
        {"key": "a", "url": "u", "caption": "c", "meta": {}, "input_ids": [1, 5, 6, 2], "image": torch.ones(3, 4, 6)},
        {"key": "b", "url": "u", "caption": "c", "meta": {}, "input_ids": [1, 7, 2], "image": torch.ones(3, 6, 4)},
    ]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["images"].shape == (2, 3, 6, 6)
    assert batch["image_mask"][0].sum() == 24 and not batch["image_mask"][0, 5].any()
    assert batch["images"][1, :, :, 4:].abs().sum() == 0


# ----------------------------------------------------------------------------- streaming


def test_round_trip_two_workers_each_sample_once(tmp_path, tokenizer_dir):
    written = write_img2dataset_shards(tmp_path / "s", num_shards=4, per_shard=5)
    dm = make_dm({"predict": str(tmp_path / "s")}, tokenizer_dir, num_workers=2, batch_size=3)
    read = keys_of(dm.predict_dataloader())
    assert len(read) == len(written)
    assert Counter(read) == Counter(written)
    assert sum(dm.counter.totals().values()) == 0


def test_brace_pattern_and_counts_from_img2dataset_stats(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", num_shards=3, per_shard=4)
    shards = resolve_shards(str(tmp_path / "s" / "{00000..00002}.tar"))
    assert len(shards) == 3 and shards.num_samples == 12
    dm = make_dm({"predict": str(tmp_path / "s" / "{00000..00001}.tar")}, tokenizer_dir)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["meta"][0]["status"] == "success" and batch["meta"][0]["url"].startswith("http")
    assert batch["input_ids"][:, 0].eq(dm.tokenizer.bos_token_id).all()


def test_png_and_webp_images_load(tmp_path, tokenizer_dir):
    def image(i):
        if i % 2:
            return "png", png_bytes("RGBA", color=(200, 0, 0, 255))
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 0, 0)).save(buf, format="WEBP", lossless=True)
        return "webp", buf.getvalue()

    write_img2dataset_shards(tmp_path / "s", 1, 4, image=image)
    dm = make_dm({"predict": str(tmp_path / "s")}, tokenizer_dir)
    batch = next(iter(dm.predict_dataloader()))
    assert len(batch["keys"]) == 4
    assert batch["images"][:, 0].mean() > 0.7 and batch["images"][:, 1].mean() < 0.1


def test_bad_input_is_skipped_and_counted(tmp_path, tokenizer_dir, caplog):
    folder = tmp_path / "s"
    # shard 0: a sample whose "jpg" is not an image, and one with an empty caption
    write_img2dataset_shards(
        folder, 2, 5,
        image=lambda i: ("jpg", b"not an image" if i == 1 else jpg_bytes()),
        caption=lambda i: "   " if i == 3 else "a circle in red",
    )
    # shard 2: truncated in the middle of its third sample
    write_img2dataset_shards(tmp_path / "t", 1, 5, stats=False, first_shard=2)
    data = (tmp_path / "t" / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[: len(data) // 2 + 100])
    dm = make_dm({"predict": str(folder)}, tokenizer_dir)
    read = keys_of(dm.predict_dataloader())
    skipped = dm.counter.totals()
    assert skipped["bad_image"] == 1
    assert skipped["empty_caption"] == 1
    assert skipped["corrupt_shard"] == 1
    assert len(read) == len(set(read))
    assert "000000001" not in read and "000000003" not in read
    assert 8 + 1 <= len(read) <= 8 + 3  # the truncated shard yields its complete samples only
    assert "bad_image" in dm.counter.report() and "corrupt_shard" in dm.counter.report()
    assert any("000000001" in r.message for r in caplog.records)


def test_too_few_shards_for_readers_is_a_clear_error(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 1, 8)
    dm = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2)
    with pytest.raises(ValueError, match="Lower `data.num_workers`"):
        dm.train_dataloader()


def test_missing_shards_say_how_to_make_them(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="make data"):
        make_dm({"train": str(tmp_path / "nope")}, tokenizer_dir).train_dataloader()


def test_train_epochs_equal_length_shuffled_and_deterministic(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 4, 10, caption=lambda i: f"a circle in red {i}")

    def epochs(seed, n=2):
        dm = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2, seed=seed, shuffle_buffer=8)
        loader = dm.train_dataloader()
        return loader, [keys_of(loader) for _ in range(n)]

    loader, (e0, e1) = epochs(seed=1)
    assert len(loader) == 40 // (2 * 4) * 2 == 10
    assert len(e0) == len(e1) == 40
    assert len(set(e0)) == len(e0)
    assert e0 != e1  # a new shard order and buffer each epoch
    assert epochs(seed=1)[1] == [e0, e1]
    assert epochs(seed=2)[1][0] != e0


def test_resume_mid_epoch_continues_the_same_stream(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 4, 10, caption=lambda i: f"a circle in red {i}")
    dm = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2, shuffle_buffer=8)
    loader = dm.train_dataloader()
    keys_of(loader)
    full = [b["keys"] for b in loader]  # data epoch 1
    state = {**dm.state_dict(), "epoch": 1, "batches_done": 3}
    dm2 = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2, shuffle_buffer=8)
    dm2.load_state_dict(state)
    rest = [b["keys"] for b in dm2.train_dataloader()]
    assert rest == full[3:]


def test_resume_skips_to_the_position_without_decoding_images(tmp_path, tokenizer_dir, monkeypatch):
    from prior.data.pipeline import SampleDecoder

    write_img2dataset_shards(tmp_path / "s", 2, 10, caption=lambda i: f"a circle in red {i}")
    decoded = []
    original = SampleDecoder.decode_image
    monkeypatch.setattr(SampleDecoder, "decode_image", lambda self, s: decoded.append(s["key"]) or original(self, s))
    dm = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=0, shuffle_buffer=8)
    dm.train_dataloader()
    dm.load_state_dict({**dm.state_dict(), "epoch": 0, "batches_done": 4})
    rest = keys_of(dm.train_dataloader())
    assert len(rest) == 20 - 16 and decoded == rest  # the 16 skipped samples were never decoded


def test_resume_with_another_data_layout_is_an_error_unless_resharding(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 4, 10, caption=lambda i: f"a circle in red {i}")
    dm = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2)
    dm.train_dataloader()
    state = {**dm.state_dict(), "epoch": 0, "batches_done": 3}
    assert state["layout"]["num_workers"] == 2 and state["layout"]["train_shards"].startswith("4 shards")
    for change in ({"num_workers": 1}, {"batch_size": 2}, {"seed": 5}):
        with pytest.raises(ValueError, match=rf"{next(iter(change))}: .* -> .*reshard_on_resume=true"):
            make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, **{"num_workers": 2, **change}).load_state_dict(state)
    write_img2dataset_shards(tmp_path / "s", 1, 10, first_shard=4)  # a shard more
    with pytest.raises(ValueError, match=r"train_shards: 4 shards, .* -> 5 shards"):
        make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="no data layout"):
        make_dm({"train": str(tmp_path / "s")}, tokenizer_dir).load_state_dict({"epoch": 0, "batches_done": 1})
    dm2 = make_dm({"train": str(tmp_path / "s")}, tokenizer_dir, num_workers=1, reshard_on_resume=True)
    dm2.load_state_dict(state)
    assert dm2.train_dataloader().epoch == -1 and dm2._train_loader._resume == (1, 0)  # the next data epoch


def test_text_only_mode_does_not_decode_images(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 1, 3, image=lambda i: ("jpg", b"garbage"))
    dm = make_dm({"predict": str(tmp_path / "s")}, tokenizer_dir, with_images=False)
    batch = next(iter(dm.predict_dataloader()))
    assert "images" not in batch and len(batch["keys"]) == 3
    assert dm.counter.totals()["bad_image"] == 0


# ----------------------------------------------------------------------------- the bad-input matrix


def _raw_shard(path, samples):
    """A shard of (key, {ext: bytes}) samples, written as given."""
    import tarfile

    from tests.helpers import add_file

    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                add_file(tar, f"{key}.{ext}", data)


def _ok(caption=b"a circle in red"):
    return {"jpg": jpg_bytes(), "txt": caption}


def test_bad_input_matrix_every_sample_read_or_skipped_and_counted(tmp_path, tokenizer_dir, monkeypatch):
    """Each kind of bad input is skipped and counted (or read, and counted where repaired);
    samples read + skipped == samples in the shards."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1400)  # the others are 40x30 or smaller
    folder = tmp_path / "m"
    folder.mkdir()
    cases = {
        "zero_byte_image": ({"jpg": b"", "txt": b"a circle"}, "bad_image"),
        "one_pixel": ({"png": png_bytes(size=(1, 1)), "txt": b"a circle"}, None),
        "bomb": ({"png": png_bytes(size=(40, 40)), "txt": b"a circle"}, "bad_image"),  # 1600 px: PIL only warns
        "bomb2": ({"png": png_bytes(size=(60, 60)), "txt": b"a circle"}, "bad_image"),  # 3600 px: PIL raises
        "cmyk": ({"jpg": _jpeg("CMYK"), "txt": b"a circle"}, None),
        "sixteen_bit": ({"png": png_bytes("I;16", (20, 20), 30000), "txt": b"a circle"}, None),
        "palette": ({"png": png_bytes("P", (20, 20), 3), "txt": b"a circle"}, None),
        "rgba": ({"png": png_bytes("RGBA", (20, 20), (1, 2, 3, 100)), "txt": b"a circle"}, None),
        "empty_caption": ({"jpg": jpg_bytes(), "txt": b""}, "empty_caption"),
        "space_caption": ({"jpg": jpg_bytes(), "txt": b" \n\t "}, "empty_caption"),
        "long_caption": (_ok(b"red circle " * 9000), None),  # ~100k characters, truncated to max_length
        "latin1_caption": (_ok("a caf\xe9 circle".encode("latin-1")), "caption_not_utf8"),
        "no_txt": ({"jpg": jpg_bytes()}, "missing_field"),
        "no_image": ({"txt": b"a circle"}, "missing_field"),
        "bad_json": ({**_ok(), "json": b"{not json"}, "bad_json"),
        "dotted.key.v2": (_ok(), None),
    }
    _raw_shard(folder / "00000.tar", [(k, f) for k, (f, _) in cases.items()])
    _raw_shard(folder / "00001.tar", [("single", _ok())])  # a 1-sample shard
    dm = make_dm({"predict": str(folder)}, tokenizer_dir, max_length=32, num_workers=4)  # more workers than shards
    batches = list(dm.predict_dataloader())
    read = [k for b in batches for k in b["keys"]]
    expected_read = {k for k, (_, r) in cases.items() if r in (None, "caption_not_utf8")} | {"single"}
    assert sorted(read) == sorted(expected_read), (dm.counter.totals(), dm.counter.notes())
    totals, notes = dm.counter.totals(), dm.counter.notes()
    for reason in ("bad_image", "empty_caption", "missing_field", "bad_json"):
        assert totals[reason] == sum(r == reason for _, r in cases.values()), reason
    assert totals["corrupt_shard"] == 0 and notes["caption_not_utf8"] == 1
    assert notes["read"] + dm.counter.skipped_samples() == len(cases) + 1
    assert dm.counter.report().startswith(f"Data: {len(read)} samples read, {len(cases) + 1 - len(read)} skipped")
    ids = {k: n for b in batches for k, n in zip(b["keys"], b["attention_mask"].sum(1).tolist())}
    assert ids["long_caption"] == 32
    captions = {k: c for b in batches for k, c in zip(b["keys"], b["captions"])}
    assert "\ufffd" in captions["latin1_caption"]
    images = {k: im for b in batches for k, im in zip(b["keys"], b["images"])}
    assert images["one_pixel"].shape == (3, 32, 32)


def _jpeg(mode):
    buf = io.BytesIO()
    Image.new(mode, (20, 20), (0, 255, 255, 0) if mode == "CMYK" else 0).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("cut", ["in_data", "at_header", "in_header"])
def test_a_cut_tar_is_counted_wherever_it_was_cut(tmp_path, tokenizer_dir, cut):
    import tarfile

    write_img2dataset_shards(tmp_path / "w", 1, 4, stats=False)
    data = (tmp_path / "w" / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "w" / "00000.tar") as tar:
        members = tar.getmembers()
    third = members[6]  # the first file of the third sample
    at = {"in_data": third.offset_data + 10, "at_header": third.offset, "in_header": third.offset + 100}[cut]
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(data[:at])
    dm = make_dm({"predict": str(folder)}, tokenizer_dir)
    read = keys_of(dm.predict_dataloader())
    assert len(read) == 2  # the two whole samples before the cut
    assert dm.counter.totals()["corrupt_shard"] == 1, cut


def test_pipe_shard_specs_are_refused_unless_allowed(tmp_path, tokenizer_dir):
    write_img2dataset_shards(tmp_path / "s", 1, 4)
    spec = f"pipe:cat {tmp_path / 's' / '00000.tar'}"
    with pytest.raises(ValueError, match=r"shell command.*data.allow_pipe=true"):
        make_dm({"predict": spec}, tokenizer_dir).predict_dataloader()
    assert len(keys_of(make_dm({"predict": spec}, tokenizer_dir, allow_pipe=True).predict_dataloader())) == 4

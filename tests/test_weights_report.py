"""`prior-weights-report` on data that is not the demo corpus: img2dataset shards with real-looking
captions and sidecars written here (no reference LM: the weights are chosen per word)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from prior.cli.weights_report import WORDS_FILE, weights_report
from prior.data.sidecars import Sidecar, sidecar_path
from prior.data.tokenization import encode_caption, load_tokenizer, train_bpe_tokenizer
from prior.eval.token_weights import caption_words, word_class, word_statistics
from tests.conftest import compose_config
from tests.helpers import Terminal, jpg_bytes, write_img2dataset_shards

CAPTIONS = [
    "a red xylophone on the wooden table",
    "the red bicycle near a wooden fence",
    "photo of a red kite in the sky",
    "a red umbrella and the rain",
]
#: The weight every piece of these words gets; every other word 0.5 (alpha 1: w = 1 - p_ref).
WORD_WEIGHT = {"red": 0.9, "the": 0.1, "a": 0.2}
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


def _weight(tokenizer, caption: str, ids: list[int]) -> np.ndarray:
    """Per scored token: its word's weight in WORD_WEIGHT (0.5 otherwise), EOS 0.3."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    words = {m.start(): m.group() for m in re.finditer(r"\S+", caption)}
    out = []
    for start, end in enc["offset_mapping"][: len(ids)]:
        first = next(c for c in range(start, len(caption)) if not caption[c].isspace())
        word = next(w for s, w in words.items() if s <= first < s + len(w))
        out.append(WORD_WEIGHT.get(word, 0.5))
    return np.asarray(out + [0.3] * (len(ids) - len(out)), dtype=np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two img2dataset shards of 6 samples, a tiny byte-level BPE (words in several pieces) and
    one sidecar per shard."""
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    write_img2dataset_shards(shards, 2, 6, caption=lambda i: CAPTIONS[i % len(CAPTIONS)],
                             image=lambda i: ("jpg", jpg_bytes(color=(20 * i, 100, 200))))
    tokenizer = train_bpe_tokenizer(CAPTIONS, vocab_size=290, min_frequency=2)
    tokenizer.save_pretrained(root / "tokenizer")
    for url in sorted(str(p) for p in shards.glob("*.tar")):
        records = []
        for s in wds.WebDataset(url, shardshuffle=False):
            caption = s["txt"].decode()
            ids = encode_caption(tokenizer, caption, 64)[1:]
            w = _weight(tokenizer, caption, ids)
            records.append((s["__key__"], ids, np.log1p(-w), w))
        Sidecar.build(records, {"tokenizer_fingerprint": "test", "reference": "test"}).save(sidecar_path(url))
    return root


def _cfg(root: Path, *overrides: str):
    return compose_config("weights_report", root, [
        f"shards={root / 'shards'}", f"tokenizer={root / 'tokenizer'}", "max_length=64",
        f"out={root / 'report' / 'token_weights.html'}", "min_word_count=4", "top_words=3", *overrides,
    ])


def test_the_report_on_img2dataset_shards_shows_words_images_and_a_legend(data, monkeypatch):
    tokenizer = load_tokenizer(data / "tokenizer")
    pieces = tokenizer.tokenize(" xylophone")
    assert len(pieces) > 1 and "xylophone" not in pieces  # the word is split: the page must join it
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stats = weights_report(_cfg(data))
    assert "weights report: reading samples" in terminal.getvalue() and "12/12" in terminal.getvalue()
    assert set(stats) == {"all", "eos"}  # no demo spans: no token kinds
    assert stats["eos"]["mean"] == pytest.approx(0.3) and stats["eos"]["tokens"] == 12

    words = json.loads((data / "report" / WORDS_FILE).read_text())
    assert words["highest"][0] == {"word": "red", "count": 12, "mean": pytest.approx(0.9), "class": "content"}
    assert words["lowest"][0] == {"word": "the", "count": 12, "mean": pytest.approx(0.1), "class": "function"}
    # seen at least 4 times: a, red, the (12 times each) and wooden (6); kite, sky, ... only 3 times
    assert [r["word"] for r in words["lowest"]] == ["the", "a", "wooden"]
    assert [r["word"] for r in words["words"]] == ["red", "wooden", "a", "the"] and words["distinct_words"] == 18
    assert words["word_classes"]["function"]["mean"] < words["word_classes"]["content"]["mean"]
    first = words["positions"][0]  # "a" x6, "the" x3, "photo" x3 begin the captions
    assert first["position"] == 0 and first["tokens"] == 12
    assert first["mean"] == pytest.approx((6 * 0.2 + 3 * 0.1 + 3 * 0.5) / 12)
    assert sum(p["tokens"] for p in words["positions"]) == stats["all"]["tokens"] - stats["eos"]["tokens"]
    assert json.loads((data / "report" / "token_weights.json").read_text()) == stats

    page = (data / "report" / "token_weights.html").read_text()
    assert page.count('class="sample"') == 12 and page.count('<img class="thumb"') == 12
    assert page.count("data:image/jpeg;base64,") == 12
    # the word whole, its pieces (with their weights) on hover
    title = rf'xylophone  w=0\.50 \(mean of {len(pieces)} pieces\)([^"]*)'
    whole = re.search(rf'<span title="{title}" style="[^"]*">xylophone</span>', page)
    assert whole and whole.group(1).count("w=0.50") == len(pieces)
    assert all(f"‘{p.replace('Ġ', '␣')}’" in whole.group(1) for p in pieces)
    assert 'class="legend"' in page and "rgba(220,40,90,1.00)" in page
    assert "Ġ" not in page


def test_whole_words_by_offsets_and_by_incremental_decoding_agree():
    tokenizer = train_bpe_tokenizer(CAPTIONS, vocab_size=290, min_frequency=2)

    class NoOffsets:  # a tokenizer without offsets (a slow one): decoded one token more at a time
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    caption = "a café, 日本  \n wooden"
    ids = encode_caption(tokenizer, caption)[1:]
    text, fast = caption_words(tokenizer, caption, ids)
    decoded, slow = caption_words(NoOffsets(), caption, ids)
    assert text == decoded == caption
    expected = ["a", "café,", "日本", "wooden", tokenizer.eos_token]
    assert [w.text for w in fast] == [w.text for w in slow] == expected
    assert [w.tokens for w in fast] == [w.tokens for w in slow]
    assert sorted(t for w in fast for t in w.tokens) == list(range(len(ids)))
    assert fast[-1].eos and "".join(fast[1].pieces).strip() == "café,"
    truncated = caption_words(tokenizer, caption, ids[:3])[1]  # max_length cut inside a word: no EOS
    assert not truncated[-1].eos and sum(len(w.tokens) for w in truncated) == 3


def test_word_classes():
    assert [word_class(w) for w in ("the", "xylophone", "2019", "|")] == ["function", "content", "number", "punctuation"]
    assert word_statistics([], min_count=1)["words"] == []


def test_the_report_logs_its_page_and_tables_to_wandb(data, tmp_path, monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    weights_report(_cfg(data, "logger=wandb", f"paths.output_dir={run}", "html_examples=2"))
    (offline,) = (run / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    (page,) = (media / "html" / "weights_report").glob("page_*.html")
    assert page.read_text().count('<img class="thumb"') == 2 and ">xylophone</span>" in page.read_text()
    (words,) = (media / "table" / "weights_report").glob("words_*.table.json")
    table = json.loads(words.read_text())
    assert table["columns"] == ["word", "count", "mean weight", "class"]
    assert table["data"][0][:2] == ["red", 12]
    for name in ("kinds", "positions", "word_classes"):
        assert list((media / "table" / "weights_report").glob(f"{name}_*.table.json")), name

from __future__ import annotations

import pytest

from prior.data.tokenization import (
    encode_caption,
    fingerprint,
    load_tokenizer,
    special_ids,
    train_bpe_tokenizer,
)

TEXTS = [
    "Stock photo of two shapes: a circle in red on the left and a square in blue",
    "Image of one shape: a large star in yellow in the middle. click to enlarge",
    "three shapes: a heart in pink, a diamond in purple and a triangle in green",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


def test_train_save_reload_same_ids_and_fingerprint(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    for text in TEXTS[:3] + ["unseen wörds 123 $4.99"]:
        assert encode_caption(again, text) == encode_caption(tok, text)
    assert fingerprint(again) == fingerprint(tok)
    assert special_ids(again) == special_ids(tok)


def test_different_tokenizer_different_fingerprint(tok):
    other = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert fingerprint(other) != fingerprint(tok)


def test_caption_template_bos_eos_and_truncation(tok):
    bos, eos, pad = special_ids(tok)
    assert len({bos, eos, pad}) == 3
    ids = encode_caption(tok, "a circle in red")
    assert ids[0] == bos and ids[-1] == eos
    assert tok.decode(ids[1:-1]) == "a circle in red"
    assert bos not in ids[1:] and eos not in ids[:-1]
    short = encode_caption(tok, TEXTS[0], max_length=5)
    assert len(short) == 5 and short[0] == bos and eos not in short
    assert short == encode_caption(tok, TEXTS[0])[:5]
    with pytest.raises(ValueError, match="at least 2"):
        encode_caption(tok, "x", max_length=1)


def test_missing_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="make tokenizer"):
        load_tokenizer(tmp_path / "nope")


def test_prior_tokenizer_shows_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    import sys

    from prior.cli.tokenizer import train_tokenizer
    from tests.helpers import Terminal, write_img2dataset_shards

    write_img2dataset_shards(tmp_path / "shards", 2, 5, caption=lambda i: TEXTS[i])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train_tokenizer(str(tmp_path / "shards"), str(tmp_path / "tok"), vocab_size=300, min_frequency=1)
    assert "tokenizer: reading captions" in terminal.getvalue() and "10/10" in terminal.getvalue()
    monkeypatch.undo()
    train_tokenizer(str(tmp_path / "shards"), str(tmp_path / "tok2"), vocab_size=300, min_frequency=1)
    assert "reading captions" not in capsys.readouterr().err  # not a terminal: no bar

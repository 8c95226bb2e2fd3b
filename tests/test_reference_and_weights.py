from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from prior.cli.weights import compute_weights
from prior.cli.weights_report import weights_report
from prior.data.shards import resolve_shards
from prior.data.sidecars import (
    Sidecar,
    SidecarError,
    WeightJoiner,
    is_complete,
    load_sidecar,
    read_meta,
    sidecar_path,
)
from prior.data.tokenization import encode_caption, fingerprint, load_tokenizer
from prior.loss import token_weights
from tests.conftest import compose_config


def _token_ids(split_dir, tokenizer):
    for url in resolve_shards(str(split_dir)).urls:
        for s in wds.WebDataset(url, shardshuffle=False):
            yield encode_caption(tokenizer, s["txt"].decode(), 80)[1:]


def test_reference_lm_beats_unigram_perplexity(demo):
    tok = load_tokenizer(demo.tokenizer)
    counts = Counter(t for ids in _token_ids(demo.data / "train", tok) for t in ids)
    total, vocab = sum(counts.values()), len(tok)
    nll, n = 0.0, 0
    for ids in _token_ids(demo.data / "val", tok):
        for t in ids:
            nll -= math.log((counts[t] + 1) / (total + vocab))
            n += 1
    unigram_ppl = math.exp(nll / n)
    ref_ppl = demo.ref_metrics["val/ppl"]
    assert ref_ppl < 0.5 * unigram_ppl, (ref_ppl, unigram_ppl)


def test_weights_rank_visual_words_above_boilerplate(demo):
    cfg = compose_config("weights_report", demo.root, ["limit=256", "html_examples=5"])
    stats = weights_report(cfg)
    assert stats["visual"]["mean"] > stats["boilerplate"]["mean"] + 0.1
    assert stats["color_counter"]["mean"] > stats["color_typical"]["mean"]
    assert stats["noise"]["mean"] > stats["function"]["mean"]
    page = (demo.root / "artifacts" / "demo" / "token_weights.html").read_text()
    assert "rgba(220,40,90," in page and page.count("<p><code>") == 5


def test_sidecars_hold_every_sample_with_the_stage_contract(demo):
    tok = load_tokenizer(demo.tokenizer)
    for url in resolve_shards(str(demo.data / "val")).urls:
        sidecar = load_sidecar(sidecar_path(url))
        assert sidecar.meta["tokenizer_fingerprint"] == fingerprint(tok)
        assert sidecar.meta["reference_path"] == str(demo.reference)
        samples = list(wds.WebDataset(url, shardshuffle=False))
        assert sorted(sidecar.keys) == sorted(s["__key__"] for s in samples)
        for s in samples[:5]:
            ids, logp, w = sidecar.get(s["__key__"])
            assert ids.tolist() == encode_caption(tok, s["txt"].decode(), 80)[1:]
            assert np.all(logp <= 0) and np.allclose(w, token_weights(torch.from_numpy(logp)).numpy())


def test_rerun_skips_finished_shards(demo, capsys):
    before = {u: read_meta(sidecar_path(u))["created"] for u in resolve_shards(str(demo.data / "val")).urls}
    summary = compute_weights(compose_config("weights", demo.root, ["num_workers=0"]))
    assert summary["shards_scored_now"] == 0
    assert summary["samples"] == 3000 + 256
    after = {u: read_meta(sidecar_path(u))["created"] for u in before}
    assert after == before
    assert "0 scored now" in capsys.readouterr().out


def _sidecar(keys=("a", "b")) -> Sidecar:
    records = [(k, [5, 6, 2], np.log([0.5, 0.9, 0.99]), 1 - np.array([0.5, 0.9, 0.99])) for k in keys]
    return Sidecar.build(records, {"tokenizer_fingerprint": "fp-A", "reference": "ref-1"})


def test_sidecar_round_trip_and_killed_write(tmp_path):
    path = tmp_path / "00000.prior.npz"
    _sidecar().save(path)
    again = load_sidecar(path)
    assert again.keys == ["a", "b"] and again.meta["num_samples"] == 2
    ids, logp, w = again.get("b")
    assert ids.tolist() == [5, 6, 2] and np.allclose(w, [0.5, 0.1, 0.01])
    assert is_complete(path, "fp-A", "ref-1")
    assert not is_complete(path, "fp-B", "ref-1") and not is_complete(path, "fp-A", "ref-2")
    # a write killed half-way leaves at most a temp file, or (on a copy) a truncated file:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not is_complete(path, "fp-A", "ref-1")
    with pytest.raises(SidecarError, match="re-run stage 2"):
        read_meta(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_joiner_errors_name_fingerprints_keys_and_the_command(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")
    joiner = WeightJoiner("fp-B")
    with pytest.raises(SidecarError, match=r"prior-weights shards=.*loss=ntp"):
        joiner(str(shard), "a", [1, 5, 6, 2])
    _sidecar().save(sidecar_path(str(shard)))
    with pytest.raises(SidecarError, match=r"fp-A.*fp-B.*first key a"):
        joiner(str(shard), "a", [1, 5, 6, 2])
    ok = WeightJoiner("fp-A")
    assert np.allclose(ok(str(shard), "a", [1, 5, 6, 2]), np.log([0.5, 0.9, 0.99]))
    assert np.allclose(ok(str(shard), "a", [1, 5, 6]), np.log([0.5, 0.9]))  # truncated: a prefix
    with pytest.raises(SidecarError, match="Token ids of sample a"):
        ok(str(shard), "a", [1, 5, 7, 2])
    with pytest.raises(SidecarError, match="no entry"):
        ok(str(shard), "zz", [1, 5, 6, 2])

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

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
    shard_identity,
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
    assert "rgba(220,40,90," in page and page.count('class="sample"') == page.count('<img class="thumb"') == 5
    assert "<h2>By token kind</h2>" in page and "<td>color_counter</td>" in page  # the demo's kinds


def test_sidecars_hold_every_sample_with_the_stage_contract(demo):
    tok = load_tokenizer(demo.tokenizer)
    stage3_length = compose_config("train_lvlm", demo.root).data.max_length  # the recipe's, in every stage
    for url in resolve_shards(str(demo.data / "val")).urls:
        sidecar = load_sidecar(sidecar_path(url))
        assert sidecar.meta["tokenizer_fingerprint"] == fingerprint(tok)
        assert sidecar.meta["reference_path"] == str(demo.reference)
        assert sidecar.meta["max_length"] == stage3_length and sidecar.meta["shard_name"] == Path(url).name
        assert sidecar.meta["shard_bytes"] == Path(url).stat().st_size
        samples = list(wds.WebDataset(url, shardshuffle=False))
        assert sorted(sidecar.keys) == sorted(s["__key__"] for s in samples)
        for s in samples[:5]:
            ids, logp, w = sidecar.get(s["__key__"])
            assert ids.tolist() == encode_caption(tok, s["txt"].decode(), sidecar.meta["max_length"])[1:]
            assert np.all(logp <= 0) and np.allclose(w, token_weights(torch.from_numpy(logp)).numpy())


def test_rerun_skips_finished_shards(demo, capsys):
    before = {u: read_meta(sidecar_path(u))["created"] for u in resolve_shards(str(demo.data / "val")).urls}
    summary = compute_weights(compose_config("weights", demo.root, ["num_workers=0"]))
    assert summary["shards_scored_now"] == 0
    assert summary["samples"] == 3000 + 256
    after = {u: read_meta(sidecar_path(u))["created"] for u in before}
    assert after == before
    assert "0 scored now" in capsys.readouterr().out


def _sidecar(keys=("a", "b"), shard=None, max_length=8, logp=(0.5, 0.9, 0.99)) -> Sidecar:
    records = [(k, [5, 6, 2], np.log(logp), 1 - np.array(logp)) for k in keys]
    identity = shard_identity(str(shard)) if shard is not None else {}
    return Sidecar.build(records, {"tokenizer_fingerprint": "fp-A", "reference": "ref-1",
                                   "max_length": max_length, **identity})


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
    _sidecar(shard=shard).save(sidecar_path(str(shard)))
    with pytest.raises(SidecarError, match=r"fp-A.*fp-B.*first key a"):
        joiner(str(shard), "a", [1, 5, 6, 2])
    ok = WeightJoiner("fp-A")
    assert np.allclose(ok(str(shard), "a", [1, 5, 6, 2]), np.log([0.5, 0.9, 0.99]))
    assert np.allclose(ok(str(shard), "a", [1, 5, 6]), np.log([0.5, 0.9]))  # truncated: a prefix
    with pytest.raises(SidecarError, match="Token ids of sample a"):
        ok(str(shard), "a", [1, 5, 7, 2])
    with pytest.raises(SidecarError, match="no entry"):
        ok(str(shard), "zz", [1, 5, 6, 2])


def test_sidecars_of_same_named_shards_in_one_folder_do_not_collide(demo, tmp_path, capsys):
    """val/00000.tar and test/00000.tar in one sidecar_dir: one sidecar each, each of its shard."""
    shards = [str(demo.data / "val"), str(demo.data / "test")]
    cfg = compose_config("weights", demo.root, ["num_workers=0", f"sidecar_dir={tmp_path}", f"shards={shards}"])
    summary = compute_weights(cfg)
    urls = resolve_shards(shards).urls
    assert summary["shards_scored_now"] == len(urls) == 4
    assert len(set(sidecar_path(u, str(tmp_path)) for u in urls)) == 4 and len(list(tmp_path.glob("*.npz"))) == 4
    for url in urls:
        sidecar = load_sidecar(sidecar_path(url, str(tmp_path)))
        assert sorted(sidecar.keys) == sorted(s["__key__"] for s in wds.WebDataset(url, shardshuffle=False))
    # the "done" check tells them apart: a re-run scores nothing
    assert compute_weights(cfg)["shards_scored_now"] == 0


def test_done_check_and_joiner_read_max_length_and_shard_identity(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"x" * 1024)
    path = sidecar_path(str(shard))
    _sidecar(shard=shard, max_length=80).save(path)
    assert is_complete(path, "fp-A", "ref-1", shard_url=str(shard), max_length=80)
    assert is_complete(path, "fp-A", "ref-1", shard_url=str(shard), max_length=64)  # a longer scoring serves
    assert not is_complete(path, "fp-A", "ref-1", shard_url=str(shard), max_length=128)
    # before any caption is read, a run with longer captions is told what to re-run
    with pytest.raises(SidecarError, match=r"max_length=80.*prior-weights max_length=128"):
        WeightJoiner("fp-A", max_length=128).check(str(shard))
    WeightJoiner("fp-A", max_length=80).check(str(shard))
    # another shard's sidecar (same stem elsewhere, copied) or a changed shard is not accepted
    other = tmp_path / "val" / "00000.tar"
    other.parent.mkdir()
    other.write_bytes(b"y" * 2048)
    sidecar_path(str(other)).write_bytes(path.read_bytes())
    assert not is_complete(sidecar_path(str(other)), "fp-A", "ref-1", shard_url=str(other))
    with pytest.raises(SidecarError, match="2048 bytes now and was 1024"):
        WeightJoiner("fp-A").check(str(other))
    # legacy sidecars without the identity or max_length are rescored
    _sidecar(max_length=None).save(path)
    assert not is_complete(path, "fp-A", "ref-1", shard_url=str(shard))
    assert not is_complete(path, "fp-A", "ref-1", max_length=8)


def test_nan_in_a_sidecar_is_an_error_not_a_fallback(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"x" * 10)
    _sidecar(keys=("a", "b"), shard=shard, logp=(0.5, float("nan"), 0.99)).save(sidecar_path(str(shard)))
    with pytest.raises(SidecarError, match=r"invalid log-probabilities.*sample a.*re-run `prior-weights`"):
        WeightJoiner("fp-A")(str(shard), "b", [1, 5, 6, 2])


def test_stage2_on_two_ranks_scores_every_shard_exactly_once(demo, tmp_path):
    """prior-weights under trainer=ddp_cpu (2 gloo processes x 2 workers) over 4 shards."""
    shards = [str(demo.data / "val"), str(demo.data / "test")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "prior.cli.weights", "trainer=ddp_cpu", "num_workers=2",
           f"paths.root_dir={demo.root}", f"hydra.run.dir={tmp_path}/run", f"sidecar_dir={tmp_path}/sc",
           f"shards=[{','.join(shards)}]"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    urls = resolve_shards(shards).urls
    scored = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("scored ")]
    assert sorted(scored) == sorted(urls)  # each shard once, none twice
    ranks = {read_meta(sidecar_path(u, f"{tmp_path}/sc"))["rank"] for u in urls}
    assert ranks == {0, 1}
    assert "Weights: 4 shards (4 scored now" in done.stdout

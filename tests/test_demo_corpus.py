"""The demo shape-world corpus: layout, determinism, ground truth, priors and the grammar."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prior.demo.corpus import (
    COLOR_RGB,
    COLORS,
    COMPANION,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    TYPICAL_COLOR,
    CorpusConfig,
    counterfactual_descriptions,
    describe,
    generate_corpus,
    parse_description,
)

TINY_SPLITS = {
    "train": {"num_samples": 256, "num_shards": 4},
    "val": {"num_samples": 64, "num_shards": 2},
    "test": {"num_samples": 64, "num_shards": 2},
    "test_counter": {"num_samples": 64, "num_shards": 2},
}
ATTRS = ("shape", "color", "size", "position")


def tiny(**overrides) -> CorpusConfig:
    return CorpusConfig(**{"splits": TINY_SPLITS, "num_workers": 1, **overrides})


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of one tar, keyed by sample key, each a dict extension -> bytes."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_split(root: Path, split: str) -> list[dict]:
    """The json of every sample of a split, with its decoded image under ``"image"``."""
    metas = []
    for tar in sorted((root / split).glob("*.tar")):
        for sample in read_shard(tar).values():
            meta = json.loads(sample["json"])
            meta["image"] = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            metas.append(meta)
    return metas


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def unplaced(obj: dict) -> tuple[str, str, str]:
    return obj["shape"], obj["color"], obj["size"]


def truth(objects: list[dict]) -> list[dict]:
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o["position"]))
    return [{k: o[k] for k in ATTRS} for o in ordered]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(tiny(), root)
    return root


@pytest.fixture(scope="module")
def samples(corpus) -> dict[str, list[dict]]:
    return {split: read_split(corpus, split) for split in TINY_SPLITS}


# --------------------------------------------------------------------------- layout and determinism


def test_manifests_match_tar_contents(corpus):
    for split, spec in TINY_SPLITS.items():
        manifest = json.loads((corpus / split / "manifest.json").read_text())
        assert manifest["split"] == split and manifest["generator_version"] == 1
        assert manifest["num_samples"] == spec["num_samples"]
        assert [s["name"] for s in manifest["shards"]] == [
            f"{i:05d}.tar" for i in range(spec["num_shards"])
        ]
        assert sorted(p.name for p in (corpus / split).glob("*.tar")) == [
            s["name"] for s in manifest["shards"]
        ]
        total = 0
        for shard_id, shard in enumerate(manifest["shards"]):
            samples = read_shard(corpus / split / shard["name"])
            assert len(samples) == shard["num_samples"]
            stats = json.loads((corpus / split / f"{shard_id:05d}_stats.json").read_text())
            assert stats["count"] == stats["successes"] == shard["num_samples"]
            assert stats["failed_to_download"] == 0
            for index, (key, sample) in enumerate(sorted(samples.items())):
                assert key == f"{shard_id:05d}{index:04d}"
                assert set(sample) == {"jpg", "txt", "json"}
                meta = json.loads(sample["json"])
                assert meta["key"] == key and meta["split"] == split
                assert meta["status"] == "success" and meta["url"] is None
                assert sample["txt"].decode() == meta["caption"]
                assert (
                    Image.open(io.BytesIO(sample["jpg"])).size
                    == (meta["width"], meta["height"])
                    == (32, 32)
                )
            total += len(samples)
        assert total == spec["num_samples"]


def test_same_seed_same_bytes_other_seed_other_bytes(corpus, tmp_path):
    generate_corpus(tiny(), tmp_path / "again")
    generate_corpus(tiny(seed=1), tmp_path / "other")
    reference = all_files(corpus)
    assert all_files(tmp_path / "again") == reference
    other = all_files(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference if name.endswith(".tar"))


def test_number_of_workers_does_not_change_output(corpus, tmp_path):
    generate_corpus(tiny(num_workers=2), tmp_path)
    assert all_files(tmp_path) == all_files(corpus)


def test_regeneration_removes_stale_shards(tmp_path):
    generate_corpus(tiny(splits={"val": {"num_samples": 8, "num_shards": 4}}), tmp_path)
    generate_corpus(tiny(splits={"val": {"num_samples": 8, "num_shards": 2}}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        ".prior-demo-data.json",
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "manifest.json",
    ]


def test_regeneration_refuses_to_delete_or_mix_in_shards_it_did_not_write(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "00003.tar").write_bytes(b"someone else's shard")
    (tmp_path / "val" / "00000.tar").write_bytes(b"and another")
    with pytest.raises(FileExistsError, match=r"2 shard\(s\) that prior-demo-data did not write \(00000.tar, 00003.tar\)"):
        generate_corpus(tiny(splits={"val": {"num_samples": 8, "num_shards": 2}}), tmp_path)
    assert (tmp_path / "val" / "00003.tar").read_bytes() == b"someone else's shard"
    assert (tmp_path / "val" / "00000.tar").read_bytes() == b"and another"


def test_config_rejects_what_the_generator_cannot_do():
    with pytest.raises(ValueError, match="unknown split"):
        tiny(splits={"training": {"num_samples": 8, "num_shards": 1}})
    with pytest.raises(ValueError, match="max_objects"):
        tiny(max_objects=4)
    with pytest.raises(ValueError, match="probability"):
        tiny(prior_p=1.5)
    with pytest.raises(ValueError, match="num_shards"):
        tiny(splits={"val": {"num_samples": 2, "num_shards": 4}})


# --------------------------------------------------------------------------- ground truth


def test_spans_index_the_caption_and_visual_spans_are_true(samples):
    seen = Counter()
    for meta in (m for split in samples.values() for m in split):
        caption, spans = meta["caption"], meta["spans"]
        assert meta["description"] in caption
        assert meta["description"] == describe(meta["objects"], meta["cue_first"])
        assert meta["count"] == len(meta["objects"])
        allowed = {COUNT_WORDS[meta["count"]]} | {o[a] for o in meta["objects"] for a in ATTRS}
        covered = np.zeros(len(caption), dtype=int)
        end = 0
        for span in spans:
            assert span["start"] >= end, "spans overlap or are out of order"
            end = span["end"]
            assert caption[span["start"] : span["end"]] == span["text"] != ""
            assert span["cls"] in {"visual", "function", "boilerplate", "noise"}
            covered[span["start"] : span["end"]] += 1
            seen[span["cls"]] += 1
            if span["cls"] == "visual":
                assert span["text"] in allowed, (span, meta["objects"])
        non_space = np.array([not c.isspace() for c in caption])
        assert (covered[non_space] == 1).all() and (covered[~non_space] == 0).all()
        visual = [s["text"] for s in spans if s["cls"] == "visual"]
        assert len(visual) == 1 + 4 * meta["count"]
    assert min(seen.values()) > 100 and len(seen) == 4


def test_images_show_the_colours_in_the_described_columns(samples):
    palette = np.array([COLOR_RGB[c] for c in COLORS], dtype=float)
    for meta in (m for split in samples.values() for m in split):
        image = meta["image"].astype(float)
        distance = np.linalg.norm(image[:, :, None, :] - palette, axis=-1)  # H, W, colours
        near = distance.min(-1) < 50
        nearest = distance.argmin(-1)
        width = image.shape[1]  # pixels lying wholly inside each third of the width:
        columns = [
            [x for x in range(width) if k * width <= 3 * x and 3 * (x + 1) <= (k + 1) * width]
            for k in range(3)
        ]
        by_position = {o["position"]: o for o in meta["objects"]}
        for position, cols in zip(POSITIONS, columns, strict=True):
            votes = Counter(COLORS[i] for i in nearest[:, cols][near[:, cols]])
            if position in by_position:
                expected = by_position[position]["color"]
                assert votes and votes.most_common(1)[0][0] == expected, (meta["key"], votes)
            else:
                assert not votes, (meta["key"], position, votes)


# --------------------------------------------------------------------------- priors per split


def test_train_follows_the_prior_at_the_configured_rate(samples):
    objects = [o for m in samples["train"] for o in m["objects"]]
    assert len(objects) > 400
    for o in objects:
        assert o["typical_color"] == TYPICAL_COLOR[o["shape"]]
        assert o["counter_prior"] == (o["color"] != o["typical_color"])
    typical = np.mean([not o["counter_prior"] for o in objects])
    assert abs(typical - 0.9) < 0.05, typical
    pairs = [
        (a["shape"], b["shape"])
        for m in samples["train"]
        for a, b in zip(m["objects"], m["objects"][1:], strict=False)
    ]
    companion = np.mean([COMPANION[a] == b for a, b in pairs])
    assert len(pairs) > 150 and abs(companion - 0.5) < 0.1, companion
    counts = Counter(m["count"] for m in samples["train"])
    assert set(counts) == {1, 2, 3}


def test_prior_rate_is_configurable(tmp_path):
    generate_corpus(
        tiny(prior_p=0.5, splits={"train": {"num_samples": 256, "num_shards": 1}}), tmp_path
    )
    objects = [o for m in read_split(tmp_path, "train") for o in m["objects"]]
    assert abs(np.mean([not o["counter_prior"] for o in objects]) - 0.5) < 0.08


def test_test_split_follows_the_prior_and_test_counter_breaks_it(samples):
    assert all(
        o["color"] == TYPICAL_COLOR[o["shape"]] for m in samples["test"] for o in m["objects"]
    )
    assert not any(m["has_counter_prior"] for m in samples["test"])
    for m in samples["test_counter"]:
        assert m["has_counter_prior"]
        assert any(o["color"] != TYPICAL_COLOR[o["shape"]] for o in m["objects"])
    assert any(m["has_counter_prior"] for m in samples["val"])


# --------------------------------------------------------------------------- grammar


OBJECTS = [
    {"shape": "square", "color": "blue", "size": "small", "position": "right"},
    {"shape": "circle", "color": "red", "size": "large", "position": "left"},
]


def test_describe_follows_the_grammar_in_both_word_orders():
    assert describe(OBJECTS) == (
        "two shapes: a large circle in red on the left and a small square in blue on the right"
    )
    assert describe(OBJECTS, cue_first=False) == (
        "two shapes: a large red circle on the left and a small blue square on the right"
    )
    three = OBJECTS + [{"shape": "star", "color": "cyan", "size": "large", "position": "middle"}]
    assert describe(three, count_word=False) == (
        "a large circle in red on the left, a large star in cyan in the middle "
        "and a small square in blue on the right"
    )
    assert describe(OBJECTS[:1]) == "one shape: a small square in blue on the right"


def test_cue_first_false_flips_the_order_in_the_corpus(samples, tmp_path):
    generate_corpus(
        tiny(cue_first=False, splits={"val": {"num_samples": 32, "num_shards": 1}}), tmp_path
    )
    flipped = read_split(tmp_path, "val")
    for metas, pattern in ((flipped, "{color} {shape}"), (samples["val"], "{shape} in {color}")):
        for m in metas:
            for o in m["objects"]:
                assert pattern.format(**o) in m["caption"], (pattern, m["caption"])
    assert all(not m["cue_first"] for m in flipped)


def test_parse_description_recovers_the_objects(samples):
    for m in (m for split in samples.values() for m in split):
        for cue_first in (True, False):
            assert parse_description(describe(m["objects"], cue_first)) == truth(m["objects"])
        assert parse_description(m["caption"]) == truth(m["objects"])


def test_parse_description_tolerates_garbage():
    assert parse_description("") == []
    assert parse_description("### in in red the left 2019-03-14 $4.99 and and") == []
    assert parse_description("a small blue squares squares , red") == [
        {"shape": "square", "color": "blue", "size": "small", "position": None},
        {"shape": "square", "color": "red", "size": None, "position": None},  # a colour after its shape
    ]
    assert parse_description("Image of a heart in pink on the right.. | click to enlarge") == [
        {"shape": "heart", "color": "pink", "size": None, "position": "right"}
    ]


@pytest.mark.parametrize("attribute", ["color", "shape", "position", "count"])
def test_counterfactuals_change_exactly_one_thing(samples, attribute):
    for m in samples["test"][:40] + samples["test_counter"][:40]:
        true_description = m["description"]
        true_objects = truth(m["objects"])
        variants = counterfactual_descriptions(m, attribute)
        assert variants and len(set(variants)) == len(variants)
        for text in variants:
            assert text != true_description
            assert text == describe(parse_description(text), m["cue_first"])  # grammatical
            objects = parse_description(text)
            if attribute in ("color", "shape"):
                assert len(objects) == len(true_objects)
                pairs = zip(objects, true_objects, strict=True)
                changed = [a for o, t in pairs for a in ATTRS if o[a] != t[a]]
                assert changed == [attribute]
            elif attribute == "position":
                assert sorted(map(unplaced, objects)) == sorted(map(unplaced, true_objects))
                moved = {o["position"] for o in objects} ^ {o["position"] for o in true_objects}
                assert len(moved) == 2 or (len(objects) == 3 and not moved)
            else:
                assert abs(len(objects) - len(true_objects)) == 1
                assert text.startswith(COUNT_WORDS[len(objects)] + " ")


def test_counterfactual_rejects_unknown_attribute(samples):
    with pytest.raises(ValueError, match="attribute"):
        counterfactual_descriptions(samples["test"][0], "texture")


def test_constants_are_consistent():
    assert set(TYPICAL_COLOR) == set(COMPANION) == set(SHAPES) and len(SHAPES) == 6
    assert set(TYPICAL_COLOR.values()) <= set(COLORS) and len(COLORS) == 8 == len(COLOR_RGB)
    assert len(set(TYPICAL_COLOR.values())) == len(SHAPES)
    assert SIZES == ("small", "large") and POSITIONS == ("left", "middle", "right")
    words = {w for w in re.findall(r"[a-z]+", " ".join(SHAPES + COLORS + SIZES + POSITIONS))}
    assert len(words) == 6 + 8 + 2 + 3


# --------------------------------------------------------------------------- command line


def test_hydra_entry_point_writes_the_tiny_corpus(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from prior.cli._hydra import CONF_DIR
    from prior.cli.demo_data import main

    overrides = ["corpus=tiny", f"out_dir={tmp_path}", "seed=5", "corpus.num_workers=1"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="demo_data", overrides=overrides)
    summary = main.__wrapped__(cfg)
    for split, spec in TINY_SPLITS.items():
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        assert manifest["seed"] == 5 and manifest["num_samples"] == spec["num_samples"]
        assert summary["splits"][split] == spec
    assert "test_counter" in capsys.readouterr().out

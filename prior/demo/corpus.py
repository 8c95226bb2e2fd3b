"""The built-in demo corpus: a shape world with language priors.

Every sample is a small RGB image (``image_size`` px, 32 by default) holding 1 to ``max_objects``
(at most 3) objects, each one in its own column of a 3-column grid. An object has a shape
(``SHAPES``), a colour (``COLORS``), a size (``SIZES``) and a position (``POSITIONS``, its column).
Backgrounds are gray, light or dark (``dark_p``), plain or textured with mild noise or stripes
(``textured_p``).

Language priors
    Each shape has a typical colour (``TYPICAL_COLOR``). In ``train`` and ``val`` every object takes
    it with probability ``prior_p``, otherwise a uniformly chosen other colour (a *counter-prior*
    object). ``test`` is prior-following: every object has its typical colour. In
    ``test_counter`` one uniformly chosen object per image is counter-prior and the others follow
    the train distribution. In every split, objects are drawn left to right and each object after
    the first is the typical companion of its left neighbour (``COMPANION``) with probability
    ``companion_p``, otherwise a uniformly chosen other shape.

Description grammar (deterministic; objects listed left to right)
    description := COUNT ("shape:" | "shapes:") OBJECT ("," OBJECT)* ["and" OBJECT]
    COUNT       := "one" | "two" | "three"
    OBJECT      := "a" SIZE SHAPE "in" COLOR PLACE       (cue_first=True, the default)
                 | "a" SIZE COLOR SHAPE PLACE            (cue_first=False)
    PLACE       := "on the left" | "in the middle" | "on the right"

    e.g. "two shapes: a large circle in red on the left and a small square in blue on the right".
    With ``cue_first`` the shape comes before its colour, so a text-only model can predict the
    colour from the shape: the prior exists in the text and only the image can overrule it.

Web-style captions
    caption := [PREFIX " "] description "." [" " NOISE] [" | " SUFFIX]
    PREFIX and SUFFIX are boilerplate phrases drawn with fixed probabilities (``PREFIXES``,
    ``SUFFIXES``); NOISE (probability ``noise_p``) is one of ``NOISE_TEMPLATES`` filled with
    image-irrelevant random values: user names, dates, ids, prices.

Verbal scenes (``scene_prefix_p``, 0 by default)
    With this probability a caption is preceded by a verbal description of its scene,
    ``[scene] large circle red left ; small square blue right [/scene] <caption>``, objects in
    random order. The corpus the demo's *base LM* is pre-trained on uses it (0.5), so that LM
    learns to read context and copy from it, as a pretrained LLM does; LVLM corpora leave it 0.

Ground truth (``<key>.json``)
    The img2dataset fields (``key``, ``url`` = None, ``status`` = "success", ``error_message``,
    ``width``, ``height``, ``original_width``, ``original_height``, ``caption``) plus ``objects``
    (left to right: shape, color, size, position, typical_color, counter_prior), ``count``,
    ``has_counter_prior``, ``description``, ``cue_first``, ``split``, ``background`` and
    ``spans``. Spans are non-overlapping character ranges ``{"start", "end", "cls", "text"}``
    of the caption that cover each of its non-space characters exactly once; ``cls`` is
    "visual" (count, size, shape, colour and position words), "function" (the description's
    other words and punctuation), "boilerplate" (prefix, suffix, the fixed words of a noise
    template) or "noise" (the random values of a noise template) or "scene" (the words of a verbal scene).

Output layout (img2dataset)
    ``<out_dir>/<split>/{00000..}.tar`` with ``<key>.jpg`` (JPEG quality 95, no chroma
    subsampling), ``<key>.txt`` and ``<key>.json`` per sample, key = f"{shard:05d}{index:04d}";
    ``<split>/{shard:05d}_stats.json`` per shard and ``<split>/manifest.json`` per split.
    The output depends only on the config and ``seed``: every shard draws from its own generator
    seeded by (seed, split, shard), so it is byte-identical whatever ``num_workers`` is.

Command line: ``prior-demo-data corpus=tiny out_dir=/tmp/demo seed=3`` (``seed`` is a root key of
``conf/demo_data.yaml``; ``corpus`` picks a size preset in ``conf/corpus/``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_counter")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

#: The language prior: the colour each shape has most of the time.
TYPICAL_COLOR: dict[str, str] = {
    "circle": "red",
    "square": "blue",
    "triangle": "green",
    "star": "yellow",
    "heart": "pink",
    "diamond": "purple",
}
#: The shape that typically stands right of each shape.
COMPANION: dict[str, str] = {
    "circle": "square",
    "square": "triangle",
    "triangle": "circle",
    "star": "heart",
    "heart": "diamond",
    "diamond": "star",
}
#: Fill colours, far apart in hue and from every gray so JPEG at 32 px keeps them apart.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (250, 140, 0),
    "pink": (255, 120, 200),
    "cyan": (20, 210, 220),
}
#: Boilerplate phrases and their probabilities ("" = none).
PREFIXES: tuple[tuple[str, float], ...] = (
    ("Stock photo of", 0.30),
    ("Image of", 0.20),
    ("Picture:", 0.15),
    ("Illustration of", 0.10),
    ("", 0.25),
)
SUFFIXES: tuple[tuple[str, float], ...] = (
    ("click to enlarge", 0.35),
    ("all rights reserved", 0.20),
    ("free download", 0.15),
    ("", 0.30),
)
#: Image-irrelevant text; each {field} is filled with a random value, the rest is boilerplate.
NOISE_TEMPLATES: tuple[str, ...] = (
    "Uploaded by {user} on {date}, id {id}",
    "Photo by {user}",
    "posted {date} by {user}",
    "only {price}",
    "ref. {id}",
    "{price} - {user}",
)
#: The markers around a verbal scene description (``scene_prefix_p``): the base LM's context.
SCENE_OPEN, SCENE_CLOSE = "[scene]", "[/scene]"
_USER_STEMS = ("user", "photog", "img", "pixel", "snap", "cam")

_SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down
_EXTENT = {"small": 0.6, "large": 0.85}  # object width as a fraction of a column


@dataclass
class SplitSpec:
    """Size of one split: samples, spread as evenly as possible over shards."""

    num_samples: int
    num_shards: int


def _default_splits() -> dict[str, SplitSpec]:
    return {
        "train": SplitSpec(20000, 10),
        "val": SplitSpec(1000, 2),
        "test": SplitSpec(1000, 2),
        "test_counter": SplitSpec(1000, 2),
    }


@dataclass
class CorpusConfig:
    """Every knob of the generator; the output is a function of these values alone."""

    seed: int = 0
    image_size: int = 32
    max_objects: int = 3
    prior_p: float = 0.9
    companion_p: float = 0.5
    cue_first: bool = True
    noise_p: float = 0.7
    textured_p: float = 0.3
    dark_p: float = 0.5
    scene_prefix_p: float = 0.0
    splits: dict[str, SplitSpec] = field(default_factory=_default_splits)
    num_workers: int = 2  # speed only: the output does not depend on it

    def __post_init__(self) -> None:
        self.splits = {  # a split given as None is not generated
            name: spec if isinstance(spec, SplitSpec) else SplitSpec(**spec)
            for name, spec in self.splits.items()
            if spec is not None
        }
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; the corpus knows {SPLITS}")
        if not 1 <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {self.max_objects}")
        for name in ("prior_p", "companion_p", "noise_p", "textured_p", "dark_p", "scene_prefix_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 px, got {self.image_size}")
        for name, spec in self.splits.items():
            if spec.num_shards < 1 or spec.num_samples < spec.num_shards:
                raise ValueError(f"split {name!r}: need 1 <= num_shards <= num_samples, got {spec}")
            if math.ceil(spec.num_samples / spec.num_shards) > 10_000:
                raise ValueError(
                    f"split {name!r}: img2dataset keys allow 10000 samples per shard; "
                    f"raise num_shards (got {spec})"
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, without ``num_workers`` (which does not shape the output)."""
        data = dataclasses.asdict(self)
        del data["num_workers"]
        return data


# --------------------------------------------------------------------------- descriptions


def _object_pieces(obj: dict, cue_first: bool) -> list[tuple[str, str]]:
    """One OBJECT of the grammar as (word, span class) pairs."""
    if cue_first:
        look = [(obj["shape"], "visual"), ("in", "function"), (obj["color"], "visual")]
    else:
        look = [(obj["color"], "visual"), (obj["shape"], "visual")]
    place = "in" if obj["position"] == "middle" else "on"
    return [
        ("a", "function"),
        (obj["size"], "visual"),
        *look,
        (place, "function"),
        ("the", "function"),
        (obj["position"], "visual"),
    ]


def _description_pieces(
    objects: list[dict], cue_first: bool, count_word: bool
) -> list[tuple[str, str | None]]:
    """The description as (text, span class) pieces; class None marks a separating space."""
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o["position"]))
    words: list[tuple[str, str]] = []
    if count_word:
        words += [
            (COUNT_WORDS[len(ordered)], "visual"),
            ("shape:" if len(ordered) == 1 else "shapes:", "function"),
        ]
    pieces: list[tuple[str, str | None]] = []
    for i, obj in enumerate(ordered):
        if 0 < i < len(ordered) - 1:
            words.append((",", "function"))
        elif i > 0:
            words.append(("and", "function"))
        words += _object_pieces(obj, cue_first)
    for text, cls in words:
        if pieces and text != ",":
            pieces.append((" ", None))
        pieces.append((text, cls))
    return pieces


def describe(objects: list[dict], cue_first: bool = True, count_word: bool = True) -> str:
    """The grammar's description of ``objects`` (dicts with shape, color, size, position)."""
    return "".join(text for text, _ in _description_pieces(objects, cue_first, count_word))


def counterfactual_descriptions(meta: dict, attribute: str) -> list[str]:
    """Descriptions of the sample ``meta`` (its json) with one ``attribute`` changed.

    ``attribute`` is "color" or "shape" (one object takes another value), "position" (one object
    moves to a free column; in a full row, where no object can move alone, two objects swap) or
    "count" (one object removed, or a copy of its nearest neighbour added in a free column).
    Every description is grammatical, distinct, and differs from the true one; the list is empty
    when no such change shows in the text (e.g. a full row of three identical objects).
    """
    objects = [{k: o[k] for k in ("shape", "color", "size", "position")} for o in meta["objects"]]
    cue_first = meta["cue_first"]
    free = [p for p in POSITIONS if p not in {o["position"] for o in objects}]
    variants: list[list[dict]] = []
    if attribute in ("color", "shape"):
        values = COLORS if attribute == "color" else SHAPES
        for i, obj in enumerate(objects):
            for value in values:
                if value != obj[attribute]:
                    variants.append(_replace(objects, i, **{attribute: value}))
    elif attribute == "position":
        for i in range(len(objects)):
            variants += [_replace(objects, i, position=p) for p in free]
        if not free:
            for i in range(len(objects)):
                for j in range(i + 1, len(objects)):
                    swapped = _replace(objects, i, position=objects[j]["position"])
                    variants.append(_replace(swapped, j, position=objects[i]["position"]))
    elif attribute == "count":
        if len(objects) > 1:
            variants += [objects[:i] + objects[i + 1 :] for i in range(len(objects))]
        for p in free:
            nearest = min(
                objects, key=lambda o: abs(POSITIONS.index(o["position"]) - POSITIONS.index(p))
            )
            variants.append(objects + [{**nearest, "position": p}])
    else:
        raise ValueError(f"attribute must be color, shape, count or position; got {attribute!r}")
    truth = describe(objects, cue_first)
    texts = dict.fromkeys(describe(v, cue_first) for v in variants)
    return [t for t in texts if t != truth]


def _replace(objects: list[dict], i: int, **changes: str) -> list[dict]:
    return [{**o, **changes} if j == i else o for j, o in enumerate(objects)]


def parse_description(text: str) -> list[dict]:
    """The objects that free text mentions, in order: dicts of shape, color, size, position.

    Follows the grammar in either word order: size and colour words before a shape belong to it,
    a colour and a position word after a shape belong to that shape (with or without the
    function words between them: a dropped "in" or "the" changes nothing); an attribute the text
    does not attach to a shape is None. Anything else (boilerplate, noise, garbage) is ignored.
    """
    objects: list[dict] = []
    pending: dict[str, str] = {}  # size/colour words waiting for the shape they modify
    for word in re.findall(r"[a-z]+", text.lower()):
        shape = word[:-1] if word.endswith("s") and word[:-1] in TYPICAL_COLOR else word
        if shape in TYPICAL_COLOR:
            objects.append(
                {
                    "shape": shape,
                    "color": pending.get("color"),
                    "size": pending.get("size"),
                    "position": None,
                }
            )
            pending = {}
        elif word in COLOR_RGB:
            # After its shape ("a circle in red", or "a circle red" with the "in" dropped) a colour
            # belongs to that shape; before one ("a red circle"), or once a size word has
            # started the next object, it waits for the next shape.
            if objects and objects[-1]["color"] is None and not pending:
                objects[-1]["color"] = word
            else:
                pending["color"] = word
        elif word in SIZES:
            pending["size"] = word
        elif word in POSITIONS and objects and objects[-1]["position"] is None and not pending:
            objects[-1]["position"] = word
    return objects


# --------------------------------------------------------------------------- sampling


def _sample_objects(rng: np.random.Generator, cfg: CorpusConfig, split: str) -> list[dict]:
    count = int(rng.integers(1, cfg.max_objects + 1))
    columns = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    shapes: list[str] = []
    for _ in range(count):
        if shapes and rng.random() < cfg.companion_p:
            shapes.append(COMPANION[shapes[-1]])
        else:
            others = [s for s in SHAPES if not shapes or s != COMPANION[shapes[-1]]]
            shapes.append(others[rng.integers(len(others))])
    counter = rng.random(count) >= cfg.prior_p
    if split == "test":
        counter[:] = False
    elif split == "test_counter":
        counter[rng.integers(count)] = True
    objects = []
    for column, shape, is_counter in zip(columns, shapes, counter, strict=True):
        typical = TYPICAL_COLOR[shape]
        others = [c for c in COLORS if c != typical]
        objects.append(
            {
                "shape": shape,
                "color": others[rng.integers(len(others))] if is_counter else typical,
                "size": SIZES[rng.integers(len(SIZES))],
                "position": POSITIONS[column],
                "typical_color": typical,
                "counter_prior": bool(is_counter),
            }
        )
    return objects


def _shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) with half-extent r (circles are drawn as ellipses)."""
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return list(zip(cx + x * r / 16, cy + (y - 2.5) * r / 15, strict=True))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, cfg: CorpusConfig) -> tuple[np.ndarray, dict]:
    size = cfg.image_size
    tone = "dark" if rng.random() < cfg.dark_p else "light"
    level = rng.uniform(35, 75) if tone == "dark" else rng.uniform(175, 215)
    gray = np.full((size, size), level)
    texture = "plain"
    if rng.random() < cfg.textured_p:
        texture = ("noise", "stripes")[rng.integers(2)]
        if texture == "noise":
            gray += rng.normal(0, 7, (size, size))
        else:
            period = int(rng.integers(2, 5)) * 2
            yy, xx = np.mgrid[:size, :size]
            coord = (yy, xx, yy + xx)[rng.integers(3)]
            gray += np.where(coord % period < period // 2, 10.0, -10.0)
    return np.repeat(gray[:, :, None], 3, axis=2), {"tone": tone, "texture": texture}


def _render(rng: np.random.Generator, cfg: CorpusConfig, objects: list[dict]) -> tuple[bytes, dict]:
    """JPEG bytes of the scene, and its background description."""
    pixels, background = _background(rng, cfg)
    big = cfg.image_size * _SUPERSAMPLE
    column = big / len(POSITIONS)
    for obj in objects:
        r = _EXTENT[obj["size"]] * column / 2
        slack = column / 2 - r
        cx = (POSITIONS.index(obj["position"]) + 0.5) * column + rng.uniform(-slack, slack) * 0.8
        cy = rng.uniform(r + 0.04 * big, big - r - 0.04 * big)
        mask = Image.new("L", (big, big), 0)
        if obj["shape"] == "circle":
            ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            ImageDraw.Draw(mask).polygon(_shape_outline(obj["shape"], cx, cy, r), fill=255)
        alpha = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float64)[:, :, None] / 255.0
        pixels = pixels * (1 - alpha) + np.array(COLOR_RGB[obj["color"]]) * alpha
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue(), background


def _caption(
    rng: np.random.Generator, cfg: CorpusConfig, objects: list[dict]
) -> tuple[str, list[dict]]:
    """A web-style caption around the description, with its character spans."""
    pieces: list[tuple[str, str | None]] = []

    def add_literal(text: str) -> None:
        for match in re.finditer(r"\S+|\s+", text):
            pieces.append((match.group(), None if match.group().isspace() else "boilerplate"))

    prefix = PREFIXES[rng.choice(len(PREFIXES), p=[p for _, p in PREFIXES])][0]
    if prefix:
        add_literal(prefix + " ")
    pieces += _description_pieces(objects, cfg.cue_first, count_word=True)
    pieces.append((".", "function"))
    if rng.random() < cfg.noise_p:
        template = NOISE_TEMPLATES[rng.integers(len(NOISE_TEMPLATES))]
        add_literal(" ")
        for part in re.split(r"(\{\w+\})", template):
            if part.startswith("{"):
                pieces.append((_noise_value(rng, part[1:-1]), "noise"))
            elif part:
                add_literal(part)
    suffix = SUFFIXES[rng.choice(len(SUFFIXES), p=[p for _, p in SUFFIXES])][0]
    if suffix:
        add_literal(" | " + suffix)
    spans, start = [], 0
    for text, cls in pieces:
        if cls is not None:
            spans.append({"start": start, "end": start + len(text), "cls": cls, "text": text})
        start += len(text)
    return "".join(text for text, _ in pieces), spans


def scene_text(objects: list[dict]) -> str:
    """The verbal scene of ``objects`` in the given order:
    ``[scene] large circle red left ; small square blue right [/scene]``."""
    entries = " ; ".join(f"{o['size']} {o['shape']} {o['color']} {o['position']}" for o in objects)
    return f"{SCENE_OPEN} {entries} {SCENE_CLOSE}"


def _with_scene_prefix(
    rng: np.random.Generator, objects: list[dict], caption: str, spans: list[dict]
) -> tuple[str, list[dict]]:
    """``caption`` preceded by the scene (objects in random order, so reading it takes content,
    not position), with the spans shifted and the prefix's words as "scene" spans."""
    order = rng.permutation(len(objects)).tolist()
    prefix = scene_text([objects[i] for i in order]) + " "
    shifted = [{**s, "start": s["start"] + len(prefix), "end": s["end"] + len(prefix)} for s in spans]
    words = [
        {"start": m.start(), "end": m.end(), "cls": "scene", "text": m.group()}
        for m in re.finditer(r"\S+", prefix)
    ]
    return prefix + caption, words + shifted


def _noise_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "user":
        return f"{_USER_STEMS[rng.integers(len(_USER_STEMS))]}_{rng.integers(10, 100000)}"
    if kind == "date":
        return f"{rng.integers(2008, 2024)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == "id":
        return str(rng.integers(10000, 1000000))
    if kind == "price":
        return f"${rng.integers(1, 100)}.{rng.integers(0, 100):02d}"
    raise ValueError(f"unknown noise field {kind!r}")


def _sample(
    rng: np.random.Generator, cfg: CorpusConfig, split: str, key: str
) -> tuple[bytes, dict]:
    objects = _sample_objects(rng, cfg, split)
    jpeg, background = _render(rng, cfg, objects)
    caption, spans = _caption(rng, cfg, objects)
    if cfg.scene_prefix_p > 0 and rng.random() < cfg.scene_prefix_p:
        caption, spans = _with_scene_prefix(rng, objects, caption, spans)
    size = cfg.image_size
    meta = {
        "key": key,
        "url": None,
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": size,
        "height": size,
        "original_width": size,
        "original_height": size,
        "split": split,
        "cue_first": cfg.cue_first,
        "count": len(objects),
        "objects": objects,
        "has_counter_prior": any(o["counter_prior"] for o in objects),
        "description": describe(objects, cfg.cue_first),
        "background": background,
        "spans": spans,
    }
    return jpeg, meta


# --------------------------------------------------------------------------- writing


def _shard_sizes(spec: SplitSpec) -> list[int]:
    base, extra = divmod(spec.num_samples, spec.num_shards)
    return [base + (1 if i < extra else 0) for i in range(spec.num_shards)]


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def _write_shard(task: tuple[CorpusConfig, str, int, int, str]) -> tuple[str, int, int]:
    cfg, split, shard, num_samples, split_dir = task
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), shard])
    members = []
    for index in range(num_samples):
        key = f"{shard:05d}{index:04d}"
        jpeg, meta = _sample(rng, cfg, split, key)
        members += [
            (f"{key}.jpg", jpeg),
            (f"{key}.txt", meta["caption"].encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))

    _atomic_write(Path(split_dir) / f"{shard:05d}.tar", write)
    _write_json(
        Path(split_dir) / f"{shard:05d}_stats.json",
        {
            "count": num_samples,
            "successes": num_samples,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": num_samples},
        },
    )
    return split, shard, num_samples


OWNED = ".prior-demo-data.json"  # the shards this generator wrote (or is writing) in a split folder


def _claim(split_dir: Path, num_shards: int) -> None:
    """Take a split folder for ``num_shards`` shards: refuse when it holds shards this generator did
    not write (they would be read as part of the corpus, and are not ours to delete); delete our
    own shards beyond ``num_shards`` with their stats and sidecars."""
    owned: set[str] = set()
    if (split_dir / OWNED).exists():
        owned |= set(json.loads((split_dir / OWNED).read_text())["shards"])
    if (split_dir / "manifest.json").exists():
        owned |= {s["name"] for s in json.loads((split_dir / "manifest.json").read_text()).get("shards", [])}
    foreign = sorted(p.name for p in split_dir.glob("*.tar") if p.name not in owned)
    if foreign:
        raise FileExistsError(
            f"{split_dir} holds {len(foreign)} shard(s) that prior-demo-data did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); it deletes nothing it did not write. Choose another "
            "out_dir, or move those files away."
        )
    new = {f"{i:05d}.tar" for i in range(num_shards)}
    _write_json(split_dir / OWNED, {"shards": sorted(owned | new)})
    for name in sorted(owned - new):
        stem = name[: -len(".tar")]
        for stale in (name, f"{stem}_stats.json", f"{stem}.prior.npz"):
            (split_dir / stale).unlink(missing_ok=True)
    _write_json(split_dir / OWNED, {"shards": sorted(new)})


def generate_corpus(cfg: CorpusConfig, out_dir: str | os.PathLike) -> dict:
    """Write every split of ``cfg`` under ``out_dir``; return the per-split counts and seconds."""
    start = time.perf_counter()
    out = Path(out_dir)
    tasks = []
    for split, spec in cfg.splits.items():
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        _claim(split_dir, spec.num_shards)
        (split_dir / "manifest.json").unlink(missing_ok=True)  # a split without one is incomplete
        tasks += [
            (cfg, split, shard, n, str(split_dir)) for shard, n in enumerate(_shard_sizes(spec))
        ]
    if cfg.num_workers > 1:
        with multiprocessing.Pool(min(cfg.num_workers, len(tasks))) as pool:
            done = pool.map(_write_shard, tasks, chunksize=1)
    else:
        done = [_write_shard(task) for task in tasks]
    world = {"typical_color": TYPICAL_COLOR, "companion": COMPANION, "color_rgb": COLOR_RGB}
    for split, spec in cfg.splits.items():
        shards = [
            {"name": f"{shard:05d}.tar", "num_samples": n} for s, shard, n in done if s == split
        ]
        _write_json(
            out / split / "manifest.json",
            {
                "split": split,
                "num_samples": spec.num_samples,
                "shards": shards,
                "seed": cfg.seed,
                "config": cfg.to_dict(),
                "world": world,
                "generator_version": GENERATOR_VERSION,
            },
        )
    return {
        "out_dir": str(out),
        "splits": {
            s: {"num_samples": spec.num_samples, "num_shards": spec.num_shards}
            for s, spec in cfg.splits.items()
        },
        "seconds": time.perf_counter() - start,
    }

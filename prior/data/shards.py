"""Finding shards and their sample counts (img2dataset layout, demo manifests, brace patterns)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardSet:
    """An ordered list of shard urls with their sample counts (None where unknown)."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when some shard's count is unknown."""
        return None if any(c is None for c in self.counts) else sum(self.counts)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.urls)


def resolve_shards(spec: str | Path | list[str], *, allow_pipe: bool = False) -> ShardSet:
    """Expand a shard spec into a ShardSet.

    ``spec`` is a folder of ``*.tar`` shards, a brace pattern (``data/train/{00000..00009}.tar``,
    local paths or URLs) or a list of these (nested lists, e.g. a recipe's splits, are flattened
    and null entries, a split the recipe does not have, left out); ``pipe:`` specs (a shell
    command) only with ``allow_pipe``. Sample counts come from the folder's
    ``manifest.json`` (the demo corpus) or img2dataset's per-shard ``*_stats.json``.
    """
    urls: list[str] = []
    for item in _spec_items(spec):
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(
                    f"No *.tar shards in {item}. {_MAKE_HINT}, or point `data.shards.<split>` at a "
                    "folder of WebDataset shards."
                )
            urls.extend(found)
        else:
            urls.extend(braceexpand.braceexpand(item))
    if not urls:
        raise ValueError(f"Shard spec {spec!r} expands to no shards.")
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not allow_pipe:
        raise ValueError(
            f"Shard {piped[0]} is a `pipe:` spec: WebDataset runs it as a shell command. Set "
            "data.allow_pipe=true (stage 2: allow_pipe=true) if you wrote it yourself, or give paths or URLs."
        )
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).exists():
            raise FileNotFoundError(
                f"Shard {url} does not exist. Check the path (relative paths start where the command "
                f"runs), or generate it: {_MAKE_HINT}."
            )
    return ShardSet(tuple(urls), tuple(_shard_count(u) for u in urls))


def _spec_items(spec: str | Path | list[Any] | None) -> list[str]:
    """The folders and patterns of a shard spec, nested lists flattened, null entries left out."""
    if spec is None:
        return []
    if isinstance(spec, (str, Path)):
        return [str(spec)]
    return [item for part in spec for item in _spec_items(part)]


_MAKE_HINT = ("`make data` writes the demo corpus (data/demo), `make data-base` the base corpus (data/demo_base), "
              "`make real-llm` the real-LLM corpus (data/smollm2) with its SmolLM2 weights")


def _shard_count(url: str) -> int | None:
    if "://" in url or url.startswith("pipe:"):
        return None
    path = Path(url)
    manifest = path.parent / MANIFEST
    if manifest.exists():
        for shard in json.loads(manifest.read_text()).get("shards", []):
            if shard["name"] == path.name:
                return int(shard["num_samples"])
    stats = path.with_name(f"{path.stem}_stats.json")  # img2dataset
    if stats.exists():
        data = json.loads(stats.read_text())
        return int(data.get("successes", data.get("count", 0)))
    return None

"""Test helpers: tiny shards in img2dataset's layout, written by the tests themselves."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from PIL import Image

CAPTION_WORDS = "a circle in red on the left and a square in blue on the right".split()


class Terminal(io.StringIO):
    """A stand-in for ``sys.stderr`` that says it is a terminal, so progress bars draw into it."""

    def isatty(self) -> bool:
        return True


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), color: object = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shards(
    folder: Path,
    num_shards: int,
    per_shard: int,
    *,
    caption: Callable[[int], str] = lambda i: " ".join(CAPTION_WORDS[: 3 + i % 8]),
    image: Callable[[int], tuple[str, bytes]] = lambda i: ("jpg", jpg_bytes()),
    stats: bool = True,
    first_shard: int = 0,
) -> list[str]:
    """Write shards named like img2dataset's (00000.tar, keys 000000000...) with its json fields
    and *_stats.json files; return the keys written."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    n = 0
    for shard in range(first_shard, first_shard + num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{shard:05d}{j:04d}"
                ext, img = image(n)
                text = caption(n)
                meta = {
                    "url": f"http://example.invalid/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 40,
                    "height": 30,
                    "original_width": 400,
                    "original_height": 300,
                    "caption": text,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                add_file(tar, f"{key}.{ext}", img)
                add_file(tar, f"{key}.txt", text.encode())
                add_file(tar, f"{key}.json", json.dumps(meta).encode())
                keys.append(key)
                n += 1
        if stats:
            (folder / f"{shard:05d}_stats.json").write_text(
                json.dumps({"count": per_shard, "successes": per_shard, "failed_to_download": 0})
            )
    return keys



class PauseAt(L.Callback):
    """Sleeps before training step ``step`` (after the checkpoint of the step before it is written),
    so a test can kill the run at a known point."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step == self.step:
            time.sleep(self.seconds)


class RecordSteps(L.Callback):
    """Saves, per rank, the keys of every training batch, the initial parameters (rank 0) and the
    batch and normalised gradients of the first step, to ``<out>/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out, self.keys, self.first = out, [], None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        import torch

        self.keys.append(list(batch["keys"]))
        if self.first is None:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            self.first = {"batch": {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, "grads": grads}

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        import torch

        torch.save({"keys": self.keys, "initial": self.initial, **self.first},
                   f"{self.out}/rank{trainer.global_rank}.pt")


class FailOnRank(L.Callback):
    """Raises on one rank at its first training step (a rank that hits bad data)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} failed on purpose")

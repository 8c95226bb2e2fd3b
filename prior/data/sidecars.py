"""Per-shard weight sidecars: what stage 2 writes and stage 3 reads.

A sidecar holds, for every sample key of one shard it scored: the token ids it scored (the
caption ids after BOS), the reference LM's log-probabilities of those tokens and the weights
``1 - p`` (alpha = 1; stage 3 applies its own scheme to the log-probabilities). It lives beside
its shard as ``<stem>.prior.npz`` (a stem is unique within its folder), or in a configured
``sidecar_dir`` as ``<stem>.<shard id>.prior.npz``, where the id is a hash of the shard's full
path or URL, so ``train/00000.tar`` and ``val/00000.tar`` never share a file. Its ``meta``
records the tokenizer fingerprint, the caption template, the reference LM, ``max_length`` and
the shard's identity (name and size); ``is_complete`` checks all of them, so a re-run rescores
exactly the shards whose sidecar would not serve. Writes are atomic (temp file + rename), so a
killed write leaves no file that would be accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".prior.npz"
FORMAT_VERSION = 1


class SidecarError(RuntimeError):
    """A sidecar is missing, unreadable or does not match the data it is joined to."""


def canonical_url(shard_url: str) -> str:
    """A shard's identity as a string: the absolute path of a local shard, a URL as given."""
    return shard_url if "://" in shard_url else str(Path(shard_url).resolve())


def shard_identity(shard_url: str) -> dict[str, Any]:
    """What a sidecar records about its shard: the name and (for a local shard) its size."""
    name = Path(shard_url.split("://")[-1]).name
    local = "://" not in shard_url and Path(shard_url).exists()
    return {"shard_name": name, "shard_bytes": Path(shard_url).stat().st_size if local else None}


def sidecar_path(shard_url: str, sidecar_dir: str | None = None) -> Path:
    """Where the sidecar of a shard lives: beside it, or in ``sidecar_dir`` (needed for remote
    shards) under a name made unique by a hash of the shard's full path or URL."""
    name = Path(shard_url.split("://")[-1]).name
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    if sidecar_dir is None:
        if "://" in shard_url:
            raise SidecarError(
                f"Shard {shard_url} is remote: set `sidecar_dir` to a local folder for its weights."
            )
        return Path(shard_url).with_name(stem + SUFFIX)
    shard_id = hashlib.sha256(canonical_url(shard_url).encode()).hexdigest()[:12]
    return Path(sidecar_dir) / f"{stem}.{shard_id}{SUFFIX}"


@dataclass
class Sidecar:
    """The weights of one shard, indexed by sample key."""

    keys: list[str]
    offsets: np.ndarray  # [n + 1] int64
    token_ids: np.ndarray  # [total] int32
    ref_logprobs: np.ndarray  # [total] float32
    weights: np.ndarray  # [total] float32
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self._index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids, ref_logprobs, weights) of one sample."""
        i = self._index[key]
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.token_ids[sl], self.ref_logprobs[sl], self.weights[sl]

    @classmethod
    def build(
        cls,
        records: list[tuple[str, list[int], np.ndarray, np.ndarray]],
        meta: dict[str, Any],
    ) -> Sidecar:
        """From (key, token_ids, ref_logprobs, weights) records."""
        lengths = [len(r[1]) for r in records]
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        cat = lambda i, dt: (  # noqa: E731
            np.concatenate([np.asarray(r[i], dtype=dt) for r in records]) if records else np.zeros(0, dt)
        )
        return cls(
            keys=[r[0] for r in records],
            offsets=offsets,
            token_ids=cat(1, np.int32),
            ref_logprobs=cat(2, np.float32),
            weights=cat(3, np.float32),
            meta={**meta, "format_version": FORMAT_VERSION, "num_samples": len(records)},
        )

    def save(self, path: str | Path) -> None:
        """Write atomically: a temp file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    keys=np.asarray(self.keys, dtype=str),
                    offsets=self.offsets,
                    token_ids=self.token_ids,
                    ref_logprobs=self.ref_logprobs,
                    weights=self.weights,
                    meta=np.asarray(json.dumps(self.meta)),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta of a sidecar, reading nothing else; SidecarError when it is not a valid sidecar."""
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise
    except Exception as err:  # zip, json or key errors: a damaged or foreign file
        raise SidecarError(f"{path} is not a valid weight sidecar ({err}); delete it and re-run stage 2.") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise SidecarError(f"{path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}.")
    return meta


def load_sidecar(path: str | Path) -> Sidecar:
    """Read a whole sidecar; SidecarError when it is damaged."""
    meta = read_meta(path)
    try:
        with np.load(path) as z:
            sidecar = Sidecar(
                keys=[str(k) for k in z["keys"]],
                offsets=z["offsets"],
                token_ids=z["token_ids"],
                ref_logprobs=z["ref_logprobs"],
                weights=z["weights"],
                meta=meta,
            )
    except Exception as err:
        raise SidecarError(f"{path} is damaged ({err}); delete it and re-run stage 2.") from err
    if len(sidecar.offsets) != len(sidecar) + 1 or int(sidecar.offsets[-1]) != len(sidecar.token_ids):
        raise SidecarError(f"{path} is inconsistent (offsets do not match its arrays); re-run stage 2.")
    return sidecar


def is_complete(path: str | Path, fingerprint: str, reference: str, *, shard_url: str | None = None,
                max_length: int | None = None) -> bool:
    """Whether a valid sidecar for this tokenizer and reference LM already exists (re-runs skip it):
    with ``shard_url``, made from that shard as it is now; with ``max_length``, scored at least
    that long."""
    try:
        meta = read_meta(path)
    except (FileNotFoundError, SidecarError):
        return False
    if meta.get("tokenizer_fingerprint") != fingerprint or meta.get("reference") != reference:
        return False
    if shard_url is not None and mismatch(meta, shard_url):
        return False
    return max_length is None or int(meta.get("max_length") or 0) >= max_length


def mismatch(meta: dict[str, Any], shard_url: str) -> str:
    """Why a sidecar's meta does not describe ``shard_url`` as it is now ('' when it does)."""
    now = shard_identity(shard_url)
    if meta.get("shard_name") != now["shard_name"]:
        return f"it was made for shard {meta.get('shard_name') or meta.get('shard')}, not {now['shard_name']}"
    if now["shard_bytes"] is not None and meta.get("shard_bytes") != now["shard_bytes"]:
        return f"the shard is {now['shard_bytes']} bytes now and was {meta.get('shard_bytes')} when scored"
    return ""


def check_finite(sidecar: Sidecar, path: str | Path) -> None:
    """A sidecar with a non-finite log-probability (or one above 0) is an error, never a silent
    fallback: the loss would turn it into NaN weights or into NTP."""
    logp = sidecar.ref_logprobs
    bad = ~np.isfinite(logp) | (logp > 1e-4)
    if bad.any():
        at = int(np.argmax(bad))
        key = sidecar.keys[int(np.searchsorted(sidecar.offsets, at, side="right")) - 1]
        raise SidecarError(
            f"{path} holds {int(bad.sum())} invalid log-probabilities (the first, {logp[at]}, in "
            f"sample {key}); the reference LM produced NaN/inf. Delete the sidecar and re-run "
            "`prior-weights` (in float32 if it ran in a lower precision)."
        )


class WeightJoiner:
    """Joins samples to their shard's sidecar by key and checks the token ids line up.

    Used in stage 3's data path (inside DataLoader workers): keeps the current shard's sidecar
    in memory; a missing sidecar, a missing key or different token ids stop the run.
    """

    def __init__(self, fingerprint: str, sidecar_dir: str | None = None, max_length: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.sidecar_dir = sidecar_dir
        self.max_length = max_length
        self._url: str | None = None
        self._sidecar: Sidecar | None = None

    def check(self, url: str) -> dict[str, Any]:
        """Fail early when a shard's sidecar is missing or made with another tokenizer."""
        path = sidecar_path(url, self.sidecar_dir)
        if not path.exists():
            raise SidecarError(
                f"No weight sidecar for shard {url} (expected {path}). Make it with `make weights` "
                f"or `prior-weights shards={Path(url).parent}` (set `sidecar_dir` if the weights "
                "live elsewhere), or train with `loss=ntp`, or score each batch online with "
                "`loss.reference=<reference LM folder>` (as `loss=prior_online` does)."
            )
        meta = read_meta(path)
        if meta.get("tokenizer_fingerprint") != self.fingerprint:
            first = load_sidecar(path).keys[:1]
            raise SidecarError(
                f"Sidecar {path} was made with tokenizer {meta.get('tokenizer_fingerprint')}, but this "
                f"run tokenizes with {self.fingerprint} (first key {first[0] if first else '-'}). Re-run "
                "stage 2 with this run's tokenizer, or point the run at the tokenizer that made it."
            )
        problem = mismatch(meta, url)
        if problem:
            raise SidecarError(
                f"Sidecar {path} does not belong to shard {url}: {problem}. Delete it and re-run "
                f"`prior-weights shards={Path(url).parent}`."
            )
        scored = meta.get("max_length")
        if self.max_length is not None and (scored is None or int(scored) < self.max_length):
            raise SidecarError(
                f"Sidecar {path} was scored with max_length={scored}, and this run tokenizes captions "
                f"up to {self.max_length} tokens: longer captions would have no weights. Re-run "
                f"`prior-weights max_length={self.max_length}` (it rescores only such shards), or "
                f"train with data.max_length={scored}."
            )
        return meta

    def __call__(self, url: str, key: str, input_ids: list[int]) -> np.ndarray:
        """The reference log-probabilities of ``input_ids[1:]`` for sample ``key`` of ``url``."""
        if url != self._url:
            self.check(url)
            path = sidecar_path(url, self.sidecar_dir)
            self._sidecar = load_sidecar(path)
            check_finite(self._sidecar, path)
            self._url = url
        assert self._sidecar is not None
        if key not in self._sidecar:
            raise SidecarError(
                f"Sample {key} of {url} has no entry in its sidecar: the shard changed after stage 2. "
                "Delete the sidecar and re-run `prior-weights`."
            )
        ids, logprobs, _ = self._sidecar.get(key)
        scored = input_ids[1:]
        if len(scored) > len(ids) or ids[: len(scored)].tolist() != scored:
            raise SidecarError(
                f"Token ids of sample {key} in {url} differ from its sidecar's (tokenizer "
                f"{self.fingerprint} here, {self._sidecar.meta.get('tokenizer_fingerprint')} in the "
                "sidecar; a larger max_length than stage 2 used also does this). Re-run `prior-weights` "
                "with this run's tokenizer and max_length."
            )
        return logprobs[: len(scored)]

"""`prior-tokenizer`: train the demo byte-level BPE tokenizer on the captions of some shards.

    prior-tokenizer                                   # data/demo/train -> data/demo/tokenizer
    prior-tokenizer shards=/my/shards out_dir=/my/tok vocab_size=4096
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from prior.cli._hydra import CONF_DIR
from prior.data.pipeline import SkipCounter, raw_samples
from prior.data.shards import resolve_shards
from prior.data.tokenization import fingerprint, train_bpe_tokenizer


def captions(shards: str, counter: SkipCounter) -> Iterator[str]:
    """Non-empty captions of every sample of the shards (bad input counted in ``counter``), with
    a progress bar over the samples on a terminal."""
    shard_set = resolve_shards(shards)
    samples = tqdm(raw_samples(shard_set.urls, counter), total=shard_set.num_samples,
                   desc="tokenizer: reading captions", unit="caption", disable=None)
    for raw in samples:
        text = raw.get("txt", b"").decode("utf-8", errors="replace").strip()
        if text:
            yield text
        else:
            counter.add("empty_caption", f"{raw.get('__key__')} in {raw.get('__url__')}")


def train_tokenizer(shards: str, out_dir: str, vocab_size: int, min_frequency: int) -> str:
    """Train, save to ``out_dir`` and return the tokenizer fingerprint."""
    counter = SkipCounter()
    tokenizer = train_bpe_tokenizer(captions(shards, counter), vocab_size, min_frequency)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    if counter.report():
        print(counter.report())
    return fingerprint(tokenizer)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="tokenizer")
def main(cfg: DictConfig) -> None:
    if not cfg.out_dir:
        raise ValueError("No out_dir: it defaults to recipe.tokenizer, which this recipe leaves to the LLM's own. "
                         "Give the folder to write: out_dir=<folder> (then recipe.tokenizer=<folder> in every stage).")
    start = time.perf_counter()
    fp = train_tokenizer(cfg.shards, cfg.out_dir, cfg.vocab_size, cfg.min_frequency)
    print(
        f"Tokenizer saved to {cfg.out_dir} (vocab {cfg.vocab_size}, fingerprint {fp}) "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()

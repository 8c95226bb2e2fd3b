"""``prior-demo-data``: write the built-in shape-world corpus as WebDataset shards.

    prior-demo-data                                   # default corpus into data/demo
    prior-demo-data corpus=tiny out_dir=/tmp/demo seed=3 corpus.cue_first=false
    prior-demo-data --config-name demo_base_data      # the base corpus (base LM, vision tower)

``corpus`` picks a size preset from ``conf/corpus/`` (default, small, tiny); any knob of
``prior.demo.corpus.CorpusConfig`` can be overridden as ``corpus.<knob>=...``; ``seed`` is a
root key. The corpus is a pure function of the corpus config and the seed.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from prior.cli._hydra import CONF_DIR
from prior.demo.corpus import CorpusConfig, generate_corpus


def generate_from_config(cfg: DictConfig) -> dict:
    """Generate the corpus of a composed ``demo_data`` (or ``demo_base_data``) config."""
    corpus = CorpusConfig(seed=cfg.seed, **OmegaConf.to_container(cfg.corpus, resolve=True))
    return generate_corpus(corpus, cfg.out_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo_data")
def main(cfg: DictConfig) -> dict:
    """Generate the corpus that ``cfg`` describes and print a per-split summary."""
    summary = generate_from_config(cfg)
    for split, counts in summary["splits"].items():
        print(
            f"{split:>12}: {counts['num_samples']:6d} samples in {counts['num_shards']:3d} shards"
        )
    print(f"wrote {summary['out_dir']} in {summary['seconds']:.1f} s (seed {cfg.seed})")
    return summary


if __name__ == "__main__":
    main()

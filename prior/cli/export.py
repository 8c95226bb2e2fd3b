"""`prior-export`: export a trained LVLM to plain Hugging Face transformers classes.

Reads ``model`` (a folder written by ``LVLM.save_pretrained``) and writes ``out`` with
:func:`prior.models.hf_export.export_hf`: a ``visual_encoder`` LVLM as
``LlavaForConditionalGeneration`` + ``LlavaProcessor``, an ``encoder_free`` one as
``FuyuForCausalLM`` + ``FuyuProcessor``, loadable with transformers alone. ``format=auto`` keeps
the project format where a part does not map; ``format=hf`` fails naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.models.hf_export import EXPORT_FILE, export_hf


def run_export(cfg: DictConfig) -> str:
    """Export ``cfg.model`` to ``cfg.out``, print what was written and how to load it; its kind."""
    kind = export_hf(cfg.model, cfg.out, format=cfg.format, overwrite=cfg.overwrite)
    out = Path(cfg.out)
    if kind == "prior":
        print(f"Kept the project format in {out} (a part does not map, see the warning above): load it with prior.load")
        return kind
    info = json.loads((out / EXPORT_FILE).read_text())
    print(f"Exported {cfg.model} as {info['model_class']} + its processor to {out}")
    print(f"Prompt: {info['prompt']!r} (processor kwargs {info['processor_kwargs']})")
    for note in info["notes"]:
        print(f"  - {note}")
    return kind


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_export(cfg)


if __name__ == "__main__":
    main()

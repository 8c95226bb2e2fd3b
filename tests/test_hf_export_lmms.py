"""The transformers export (``prior-export``) under lmms-eval's own ``llava_hf`` model.

A tiny visual-encoder LVLM is trained on the local demo task's split (``tests/test_lmms_eval.py``'s
``build_demo``), exported as ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` and run by
lmms-eval 0.7.3's ``llava_hf``, in its default chat form and its ``force_simple`` form. The
export's chat template writes the project's prompt (``<image>`` BOS text), so greedy captions and
their metrics must be exactly those of ``--model prior`` on the project-format folder.

What lmms-eval 0.7.3's wrappers cannot do here (their code, not the export's):

- ``llava_hf`` ``loglikelihood`` (``multiple_choice`` tasks) measures the context by running the
  processor on the prompt *without* its image; transformers 5 processors refuse a prompt with an
  ``<image>`` placeholder and no image, for every Llava checkpoint. (Under transformers 4 it ran,
  but counted the unexpanded placeholder as one token, so its "mean NLL" also averaged the image
  positions.) The choice test pins that error.
- ``fuyu`` (for the encoder-free export) hard-codes Fuyu-8B's ``FuyuImageProcessor()`` (30 px
  patches) instead of the checkpoint's processor and loads bfloat16 weights while feeding float32
  patches (``mat1 and mat2 must have the same dtype``), for any checkpoint: not tested here.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from prior.eval.lmms import GENERATION_METRICS  # noqa: E402
from prior.models.hf_export import EXPORT_FILE, export_hf  # noqa: E402
from tests.test_lmms_eval import CONF, DOCS, build_demo, datasets_cache  # noqa: E402, F401 (a fixture)

CAPTION, CHOICE = "prior_demo_caption", "prior_demo_choice_color"
#: lmms-eval's llava_hf: ``device_map`` must name a device under transformers 5 (its default "" fails).
LLAVA_ARGS = "dtype=float32,device_map=cpu,batch_size=1"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """``(root, hf export, task manager)``: the demo LVLM with a tiny ViT tower, exported to Llava."""
    from lmms_eval.tasks import TaskManager

    tower = OmegaConf.load(CONF / "backbone" / "visual_encoder.yaml")
    root, _, tasks = build_demo(tmp_path_factory.mktemp("hf_lmms"), tower, steps=150)  # 40 leave it babbling
    assert tasks == [CHOICE, CAPTION]
    assert export_hf(root / "export", root / "hf") == "llava"
    return root, root / "hf", TaskManager(include_path=str(root / "tasks"), include_defaults=False)


def _evaluate(model: str, model_args: str, task: str, manager: Any, **kwargs: Any) -> dict:
    """lmms-eval's ``simple_evaluate`` in-process on one local task, samples logged."""
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=manager, bootstrap_iters=0,
        log_samples=True, device="cpu", **kwargs,
    )  # fmt: skip


@pytest.mark.usefixtures("datasets_cache")
def test_llava_hf_captions_the_export_as_prior_does(llava):
    """Greedy captions through the export's chat template, processor and generation config: the
    same text as ``--model prior`` on the project folder, hence the same metrics."""
    root, hf, manager = llava
    from transformers import AutoTokenizer

    prefix = json.loads((hf / EXPORT_FILE).read_text())["prompt"].removesuffix("{text}")
    assert prefix.startswith("<image>") and prefix != "<image>"  # then BOS
    # llava_hf's simple model sends "<image>\n" + the task's text through the tokenizer's template
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.apply_chat_template([{"role": "user", "content": "<image>\n"}], tokenize=False,
                                   add_generation_prompt=True) == prefix  # fmt: skip

    ours = _evaluate("prior", f"pretrained={root / 'export'},batch_size=8", CAPTION, manager)
    expected = [s["resps"][0][0] for s in ours["samples"][CAPTION]]
    assert len(expected) == DOCS and len(set(expected)) > 1 and all(len(text) > 10 for text in expected)
    assert ours["results"][CAPTION]["bleu4,none"] > 0  # so that the metrics below are compared, not zeros
    for force_simple in (False, True):  # the chat model (the CLI's default) and --force_simple
        out = _evaluate("llava_hf", f"pretrained={hf},{LLAVA_ARGS}", CAPTION, manager, force_simple=force_simple)
        assert [s["resps"][0][0] for s in out["samples"][CAPTION]] == expected, force_simple
        for metric in GENERATION_METRICS:
            value = out["results"][CAPTION][f"{metric},none"]
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(ours["results"][CAPTION][f"{metric},none"]), metric


@pytest.mark.usefixtures("datasets_cache")
def test_llava_hf_cannot_score_choices_under_transformers_5(llava):
    """lmms-eval 0.7.3's ``LlavaHf.loglikelihood`` calls ``processor(text=[prompt])`` without the
    image to find where the continuation starts. If this stops raising (a fixed lmms-eval), compare
    its ``acc`` with ``--model prior``'s on the same task instead."""
    _, hf, manager = llava
    with pytest.raises(ValueError, match="Found 1 <image> tokens in the text but no images were passed"):
        _evaluate("llava_hf", f"pretrained={hf},{LLAVA_ARGS}", CHOICE, manager, force_simple=True)

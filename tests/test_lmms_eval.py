"""PRIOR LVLMs under lmms-eval: the ``prior`` model (prior/eval/lmms.py) on a local demo task.

A tiny LVLM from the real configs is overfitted for a few steps on a tiny demo split (so its
captions and choices are not degenerate), exported, and evaluated by lmms-eval's own
``simple_evaluate`` on the task folder ``write_demo_task`` writes; the results must be those
``prior-eval``'s evaluator gives for the same items.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import prior  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402  (the `lmms` extra; make install adds it)
from PIL import Image  # noqa: E402
from prior.data.tokenization import encode_caption, train_bpe_tokenizer  # noqa: E402
from prior.demo.benchmark import DemoBenchmark  # noqa: E402
from prior.demo.corpus import CorpusConfig, generate_corpus  # noqa: E402
from prior.eval.evaluator import evaluate, sequence_logprobs  # noqa: E402
from prior.eval.lmms import GENERATION_METRICS, PriorLMM, write_demo_task  # noqa: E402
from prior.loss import token_cross_entropy  # noqa: E402
from prior.models.lvlm import build_lvlm  # noqa: E402
from tests.conftest import TINY_LLM  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SPLIT = "test_counter"
DOCS = 6
MAX_NEW = 40
PREPROCESSING = {"image_size": 32, "resize": "center_crop"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A demo split with 48 px images, an LVLM trained on 32 px crops of it, its export (which
    records that preprocessing), and the lmms-eval task folder of the split."""
    return build_demo(tmp_path_factory.mktemp("lmms"), OmegaConf.load(CONF / "backbone" / "encoder_free.yaml"))


def build_demo(root: Path, backbone: DictConfig, steps: int = 40) -> tuple[Path, Path, list[str]]:
    """``(root, data, tasks)``: a demo split with 48 px images in ``root/data``, an LVLM with the
    ``backbone`` config trained ``steps`` steps on 32 px crops of it in ``root/export``
    (``LVLM.save_pretrained``, recording that preprocessing), and the split's lmms-eval task
    folder ``root/tasks``."""
    data = root / "data"
    generate_corpus(
        CorpusConfig(seed=0, image_size=48, splits={SPLIT: {"num_samples": 8, "num_shards": 1}}, num_workers=1), data
    )
    with tarfile.open(next((data / SPLIT).glob("*.tar"))) as tar:
        captions = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    tokenizer = train_bpe_tokenizer(captions * 4, vocab_size=300)
    llm = OmegaConf.load(CONF / "llm" / "tiny_llama.yaml")
    for override in TINY_LLM:
        OmegaConf.update(llm, override.removeprefix("llm."), int(override.split("=")[1]))
    torch.manual_seed(0)
    lvlm = build_lvlm(backbone, llm, tokenizer)
    items = list(DemoBenchmark(data, **PREPROCESSING).items(SPLIT))
    _overfit(lvlm, tokenizer, items, steps)
    lvlm.preprocessing = dict(PREPROCESSING)
    lvlm.save_pretrained(root / "export", tokenizer)
    tasks = write_demo_task(root / "tasks", data, split=SPLIT, limit=DOCS, max_new_tokens=MAX_NEW)
    return root, data, tasks


def _overfit(lvlm, tokenizer, items, steps: int = 40) -> None:
    """A few NTP steps on the items' descriptions, so the model's outputs are not noise."""
    ids = [encode_caption(tokenizer, item.reference) for item in items]
    length = max(map(len, ids))
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    images = torch.stack([item.image for item in items])
    opt = torch.optim.AdamW(lvlm.parameters(), lr=1e-2)
    lvlm.train()
    for _ in range(steps):
        out = lvlm(images, input_ids, mask)
        loss = token_cross_entropy(out.logits, out.targets, out.loss_mask).sum() / out.loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lvlm.eval()


@pytest.fixture()
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def test_prior_is_an_lmms_eval_model():
    from lmms_eval.models import get_model

    assert get_model("prior") is PriorLMM  # through this package's `lmms_eval.models` entry point


def test_simple_evaluate_serves_both_request_types_like_prior_eval(setup, datasets_cache):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    root, data, tasks = setup
    assert tasks == ["prior_demo_choice_color", "prior_demo_caption"]
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    out = simple_evaluate(
        model="prior", model_args=f"pretrained={root / 'export'},batch_size=8", tasks=tasks,
        task_manager=manager, bootstrap_iters=0, log_samples=True, device="cpu",
    )  # fmt: skip
    results, samples = out["results"], out["samples"]

    choice = samples["prior_demo_choice_color"]
    assert len(choice) == DOCS
    for sample in choice:  # loglikelihood: one (mean NLL, is_greedy) per choice
        assert len(sample["resps"]) == len(sample["doc"]["choices_color"]) > 1
        for (score, greedy), *_ in sample["resps"]:
            assert math.isfinite(score) and score > 0 and isinstance(greedy, bool)
    caption = samples["prior_demo_caption"]
    assert len(caption) == DOCS and all(isinstance(s["resps"][0][0], str) for s in caption)  # generate_until

    lvlm, tokenizer = prior.load(root / "export")
    bench = DemoBenchmark(data, **lvlm.preprocessing)  # what prior-eval prepares from the export
    items = bench.items(SPLIT, DOCS)
    reference = evaluate(lvlm, tokenizer, items, batch_size=8, max_new_tokens=MAX_NEW, benchmark=bench)
    acc = results["prior_demo_choice_color"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(reference.metrics["choice_accuracy_color"])
    generated = [s["resps"][0][0].strip() for s in caption]
    assert generated == [s["generation"] for s in reference.samples]
    assert any(generated)
    for metric in GENERATION_METRICS:
        value = results["prior_demo_caption"][f"{metric},none"]
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(reference.metrics[metric]), metric


def _raw_images(data: Path, n: int) -> list[Image.Image]:
    """The split's first ``n`` images as lmms-eval hands them to a model: decoded, not resized."""
    images = []
    with tarfile.open(next((data / SPLIT).glob("*.tar"))) as tar:
        for member in [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]:
            with Image.open(tar.extractfile(member)) as img:
                img.load()
                images.append(img)
    return images


def _requests(lm: PriorLMM, pairs, images) -> list[Instance]:
    """Loglikelihood requests (context, continuation) on one image each, as lmms-eval builds them."""
    lm.task_dict = {"t": {"test": [{"image": image} for image in images]}}
    return [
        Instance("loglikelihood", (ctx, cont, lambda doc: [doc["image"]], i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, (ctx, cont) in enumerate(pairs)
    ]  # fmt: skip


def test_loglikelihood_is_the_evaluators_likelihood(setup):
    root, data, _ = setup
    export = root / "export"
    lm = PriorLMM(pretrained=str(export), batch_size=2, score="sum_logprob", device="cpu")
    items = list(DemoBenchmark(data, **PREPROCESSING).items(SPLIT, 3))  # prior-eval's 32 px tensors
    raw = _raw_images(data, 3)  # the same 48 px images, prepared by the model
    texts = [item.reference for item in items] + [item.candidates["color"][0] for item in items]
    images = [*raw, *raw]
    scores = [s for s, _ in lm.loglikelihood(_requests(lm, [("", t) for t in texts], images))]
    stacked = torch.stack([item.image for item in items] * 2)
    expected = sequence_logprobs(lm.lvlm, lm.tokenizer, stacked, texts, max_length=1000)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len({round(s, 3) for s in scores}) > 1

    # A context is a prefix after BOS: log p(ctx + cont) = log p(ctx) + log p(cont | ctx).
    text = items[0].reference
    ctx, cont = text.split(":", 1)[0] + ":", text.split(":", 1)[1]
    tok = lm.tokenizer
    assert tok.encode(text, add_special_tokens=False)[: len(tok.encode(ctx, add_special_tokens=False))] == tok.encode(
        ctx, add_special_tokens=False
    )
    (conditional, _), = lm.loglikelihood(_requests(lm, [(ctx, cont)], raw[:1]))
    whole, prefix = sequence_logprobs(lm.lvlm, tok, stacked[:1].expand(2, -1, -1, -1), [text, ctx])
    assert conditional == pytest.approx(whole - prefix, abs=1e-4)

    # The default score is lmms-eval's: the mean NLL per continuation token (smallest wins).
    mean = PriorLMM(pretrained=str(export), batch_size=5, device="cpu")
    nll = [s for s, _ in mean.loglikelihood(_requests(mean, [("", t) for t in texts], images))]
    n_tokens = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    assert nll == pytest.approx([-s / n for s, n in zip(expected, n_tokens, strict=True)], abs=1e-5)

    # is_greedy: true for the model's own greedy continuation, false for one token changed.
    image = lm.image(raw[0])
    greedy_ids = lm.lvlm.generate(image[None], max_new_tokens=6)[0]
    assert len(greedy_ids) > 1
    changed = [*greedy_ids[:-1], (greedy_ids[-1] + 1) % len(tok)]
    (_, is_greedy), (_, not_greedy) = lm.score_ids([(image, [], greedy_ids), (image, [], changed)])
    assert is_greedy and not not_greedy

    # prompt=none scores the continuation from the image alone, ignoring the task's text; with
    # no context, a target_delimiter space does not change the caption's tokens.
    blind = PriorLMM(pretrained=str(export), score="sum_logprob", prompt="none", device="cpu")
    pairs = [("Is there a red circle?", texts[0]), ("", " " + texts[0])]
    ignored = [s for s, _ in blind.loglikelihood(_requests(blind, pairs, raw[:1] * 2))]
    assert ignored == pytest.approx([expected[0]] * 2, abs=1e-4)


def test_generate_until_is_greedy_and_honours_max_new_tokens_and_until(setup):
    root, data, _ = setup
    lm = PriorLMM(pretrained=str(root / "export"), device="cpu")
    raw = _raw_images(data, 2)
    lm.task_dict = {"t": {"test": [{"image": image} for image in raw]}}

    def request(i: int, gen_kwargs: dict) -> Instance:
        return Instance("generate_until", ("", gen_kwargs, lambda doc: [doc["image"]], i, "t", "test"), idx=0,
                        metadata={"task": "t", "doc_id": i, "repeats": 1})  # fmt: skip

    images = torch.stack([lm.image(image) for image in raw])
    full = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in lm.lvlm.generate(images, max_new_tokens=12)]
    short = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in lm.lvlm.generate(images, max_new_tokens=3)]
    assert len(full[0]) > 6 and full[1] != short[1]
    stop = full[0][len(full[0]) // 2 :][:3]
    out = lm.generate_until([
        request(0, {"max_new_tokens": 12, "until": [stop], "temperature": 0}),
        request(1, {"max_new_tokens": 3}),
        request(0, {"max_new_tokens": 12, "temperature": 0.7, "do_sample": True}),  # greedy anyway
    ])  # fmt: skip
    assert out == [full[0][: full[0].find(stop)], short[1], full[0]]


def test_an_export_without_preprocessing_needs_it_as_a_model_arg(setup, tmp_path):
    root, _, _ = setup
    export = tmp_path / "export"
    shutil.copytree(root / "export", export)
    spec = json.loads((export / "prior_lvlm.json").read_text())
    spec["preprocessing"] = None
    (export / "prior_lvlm.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="image_size=224"):
        PriorLMM(pretrained=str(export), device="cpu")
    lm = PriorLMM(pretrained=str(export), image_size=16, resize="resize", device="cpu")
    assert (lm.image_size, lm.resize) == (16, "resize")
    with pytest.raises(TypeError, match="Unknown model_args"):
        PriorLMM(pretrained=str(export), image_size=16, resize="resize", temprature=0)

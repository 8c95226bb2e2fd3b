"""PRIOR LVLMs under lmms-eval: the ``prior`` model, and a local demo task.

``python -m lmms_eval --model prior --model_args pretrained=<export folder> --tasks ...`` runs an
LVLM exported with ``LVLM.save_pretrained`` (loaded by ``prior.load``) on lmms-eval's tasks. The
model is registered through the ``lmms_eval.models`` entry point of this package
(``prior.eval.lmms_registry``); lmms-eval itself is the optional ``lmms`` extra (see the README).

What the model does with a request
    Images are prepared exactly as ``prior-eval`` prepares them: RGB (``to_rgb``), resized to the
    export's ``preprocessing`` (``image_size``, ``resize``: what the model was trained on, or
    ``image_size=``/``resize=`` model args) and scaled to [0, 1]. The LM then reads
    ``[image tokens] [BOS] [context] [continuation]``: the task's text (its question, prompt) is
    fed as a plain text prefix after BOS, with no chat template. A PRIOR LVLM is a *captioner*,
    pre-trained on ``[image] [BOS] caption [EOS]`` only: it was never trained to follow a question,
    so a question prefix is out of its training distribution and its yes/no or letter answers are
    not meaningful before instruction tuning. ``prompt=none`` drops the task's text and scores or
    generates from the image alone (what the model was trained for): with it, a multiple-choice
    task scores each choice as a caption of the image.

``loglikelihood``
    Per request ``(context, continuation)``, with lm-eval's split of the tokens (trailing spaces
    of the context move to the continuation; the continuation's tokens are those of
    ``context + continuation`` after the context's; without a context, the continuation is read
    as a caption right after BOS, leading spaces dropped). Returns ``(score, is_greedy)``:
    ``score`` is, by default (``score=mean_nll``), the **mean negative log-likelihood per continuation token**,
    lmms-eval's convention: its ``multiple_choice`` scoring picks the choice with the *smallest*
    value (``np.argmin`` in ``lmms_eval/api/task.py``), and its built-in LLaVA/Fuyu models return
    the mean loss. It is also what ``prior-eval``'s choice accuracy compares (the mean
    log-likelihood per token). ``score=sum_logprob`` returns the summed log-probability instead
    (lm-eval's convention), for tasks that read a log-likelihood; do not use it with lmms-eval's
    ``multiple_choice`` tasks, whose argmin would then pick the least likely choice.
    ``is_greedy``: every continuation token is the argmax at its position.

``generate_until``
    Greedy decoding (``LVLM.generate``, KV cache) up to EOS or ``max_new_tokens`` (the task's
    ``generation_kwargs``, else the model arg), cut at the first ``until`` string. Sampling
    options (``temperature`` > 0, ``do_sample``, ``num_beams`` > 1) are ignored with a warning.

One image per request: a request with several visuals (video frames, multi-image questions) uses
the first, with a warning; one without any is an error.

lmms-eval 0.7.3 needs two fixes to run here, applied when it loads this model's entry point
(``prior.eval.lmms_registry.apply_compat``): its evaluator imports filelock 3's private
``filelock._api`` (this environment has filelock 4), and it turns every loglikelihood answer
``(float, bool)`` into a string before scoring, which breaks ``multiple_choice`` for any model.

The local demo task
    :func:`write_demo_task` turns a split of the demo corpus into an lmms-eval task folder (a
    parquet file and task YAMLs, no hub access) for ``--include_path``: per attribute a
    ``multiple_choice`` task (the true description against its one-attribute counterfactuals,
    the POPE-style probe in the form a captioner can answer: its ``acc`` is ``prior-eval``'s
    ``choice_accuracy_<attribute>``), and a ``generate_until`` captioning task scored with the
    project's generation metrics (``object_recall``, ``chair_i``, ``color_hallucination``,
    ``bleu4``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from torch import Tensor

import prior
from prior.data.pipeline import (
    RESIZE_MODES,
    SampleDecoder,
    SkipCounter,
    image_to_tensor,
    raw_samples,
    resize_image,
    to_rgb,
)
from prior.data.shards import resolve_shards
from prior.data.tokenization import special_ids
from prior.demo.benchmark import demo_description
from prior.demo.corpus import counterfactual_descriptions, parse_description
from prior.eval.evaluator import _batch_images, _device_dtype
from prior.eval.lmms_registry import apply_compat
from prior.eval.metrics import CHOICE_ATTRIBUTES, GenerationCounts, TextMetricAccumulator
from prior.loss import token_cross_entropy

log = logging.getLogger(__name__)

SCORES = ("mean_nll", "sum_logprob")
PROMPTS = ("context", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PriorLMM(lmms):
    """lmms-eval model ``prior``: an exported PRIOR LVLM (see the module docstring).

    Model args (``--model_args key=value,...``): ``pretrained`` (the export folder),
    ``batch_size`` (requests per forward), ``device`` (``auto``: ``cuda:$LOCAL_RANK`` when a GPU
    is visible, else cpu), ``dtype`` (``auto``: as saved; float32, bfloat16, float16),
    ``score`` (mean_nll | sum_logprob), ``prompt`` (context | none), ``image_size``/``resize``
    (override the export's preprocessing), ``max_new_tokens`` (when a task gives none),
    ``max_length`` (cap on ``BOS + context + continuation`` ids; the context is cut from the left).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 16,
        device: str | None = "auto",
        dtype: str = "auto",
        score: str = "mean_nll",
        prompt: str = "context",
        image_size: int | None = None,
        resize: str | None = None,
        max_new_tokens: int = 64,
        max_length: int | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval; batches have a fixed size here
        **unknown: Any,
    ) -> None:
        super().__init__()
        apply_compat()  # lmms-eval 0.7.3 fixes, also when this instance is passed in directly
        if unknown:
            raise TypeError(
                f"Unknown model_args for --model prior: {sorted(unknown)}. Valid: pretrained, batch_size, device, "
                "dtype, score, prompt, image_size, resize, max_new_tokens, max_length."
            )
        if score not in SCORES:
            raise ValueError(
                f"score={score!r}: choose one of {SCORES} (mean_nll for lmms-eval's multiple_choice tasks)"
            )
        if prompt not in PROMPTS:
            raise ValueError(f"prompt={prompt!r}: choose one of {PROMPTS}")
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.score, self.prompt = score, prompt
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = None if max_length is None else int(max_length)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + one token), got {self.max_length}")

        lvlm, tokenizer = prior.load(pretrained)
        self.image_size, self.resize = _preprocessing(lvlm.preprocessing, image_size, resize, str(pretrained))
        self._device = torch.device(_device(device))
        if dtype != "auto":
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r}: choose auto or one of {sorted(DTYPES)}")
            lvlm = lvlm.to(DTYPES[dtype])
        self.lvlm = lvlm.to(self._device).eval()
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = special_ids(tokenizer)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ properties lmms-eval reads

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ lmms API

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(score, is_greedy)`` per request ``(context, continuation, doc_to_visual, doc_id,
        task, split)``; ``score`` per the ``score`` model arg (mean NLL by default)."""
        items = []
        images: dict[tuple[str, str, int], Tensor] = {}  # a multiple-choice doc's image, prepared once
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if not isinstance(continuation, str):
                raise TypeError(
                    f"{task}: the continuation of doc {doc_id} is {type(continuation).__name__}, not text; the task's "
                    "doc_to_target must give a string for loglikelihood requests"
                )
            if (task, split, doc_id) not in images:
                images[task, split, doc_id] = self.image(doc_to_visual(doc))
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            items.append((images[task, split, doc_id], context_ids, continuation_ids))
        return [self._as_output(lp, greedy) for lp, greedy in self.score_ids(items)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuation per request ``(context, gen_kwargs, doc_to_visual, doc_id, task,
        split)``, cut at the first ``until`` string."""
        jobs: dict[tuple[tuple[int, ...], int], list[int]] = {}
        images: list[Tensor] = []
        untils: list[list[str]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            self._check_greedy(gen_kwargs)
            until = gen_kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            images.append(self.image(doc_to_visual(self.task_dict[task][split][doc_id])))
            prompt_ids = tuple(self.encode_context(context))
            jobs.setdefault((prompt_ids, max_new), []).append(i)
        out: list[str] = [""] * len(requests)
        dtype = _device_dtype(self.lvlm)[1]
        with torch.no_grad():
            for (prompt_ids, max_new), indices in jobs.items():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    batch, image_mask = _batch_images([images[i] for i in chunk], self._device, dtype)
                    ids = self.lvlm.generate(batch, list(prompt_ids), max_new_tokens=max_new, image_mask=image_mask)
                    for i, row in zip(chunk, ids, strict=True):
                        out[i] = _cut(self.tokenizer.decode(row, skip_special_tokens=True), untils[i])
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "--model prior answers single-turn requests only (a PRIOR LVLM is a pre-trained captioner); "
            "pick a task with output_type generate_until or multiple_choice."
        )

    # ------------------------------------------------------------------ building blocks

    def image(self, visuals: Any) -> Tensor:
        """The request's image as ``prior-eval`` prepares it: ``[3, H, W]`` in [0, 1]."""
        flat = _flatten(visuals)
        if not flat:
            raise ValueError("--model prior needs an image per request; this task's doc_to_visual gave none")
        if len(flat) > 1:
            self._warn_once(
                "visuals", f"a request has {len(flat)} visuals; --model prior reads one image and uses the first"
            )
        visual = flat[0]
        if isinstance(visual, (str, os.PathLike)):
            if Path(visual).suffix.lower() in {".mp4", ".avi", ".mov", ".mkv", ".webm"}:
                raise ValueError(f"--model prior reads images, not videos ({visual})")
            with Image.open(visual) as img:
                img.load()
                return image_to_tensor(resize_image(to_rgb(img), self.image_size, self.resize))
        if not isinstance(visual, Image.Image):
            raise TypeError(f"--model prior reads PIL images or image paths, got {type(visual).__name__}")
        return image_to_tensor(resize_image(to_rgb(visual), self.image_size, self.resize))

    def encode_context(self, context: str) -> list[int]:
        """The ids of the text prefix fed after BOS (none with ``prompt=none``)."""
        if self.prompt == "none" or not context:
            return []
        return self.tokenizer.encode(context, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context
        go to the continuation, whose ids are those of ``context + continuation`` after the
        context's own ids. Without a context (or with ``prompt=none``) the continuation follows
        BOS directly, as a caption does, so its leading spaces (a task's ``target_delimiter``)
        are dropped."""
        if self.prompt == "none" or not context.strip():
            context, continuation = "", continuation.lstrip()
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode_context(context)
        whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
        return context_ids, whole[len(context_ids) :]

    def score_ids(self, items: Sequence[tuple[Tensor, list[int], list[int]]]) -> list[tuple[list[float], bool]]:
        """Per (image, context ids, continuation ids): the continuation's token log-probabilities
        given ``[image][BOS][context]`` (float64) and whether each token is the greedy one."""
        seqs = [self._sequence(ctx, cont) for _, ctx, cont in items]
        order = sorted(range(len(items)), key=lambda i: -len(seqs[i][0]))  # less padding per batch
        results: list[tuple[list[float], bool]] = [([], True)] * len(items)
        dtype = _device_dtype(self.lvlm)[1]
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                length = max(2, *(len(seqs[i][0]) for i in chunk))
                input_ids = torch.full((len(chunk), length), self.pad_id, dtype=torch.long)
                attention = torch.zeros(input_ids.shape, dtype=torch.bool)
                for row, i in enumerate(chunk):
                    ids = seqs[i][0]
                    input_ids[row, : len(ids)] = torch.as_tensor(ids)
                    attention[row, : len(ids)] = True
                batch, image_mask = _batch_images([items[i][0] for i in chunk], self._device, dtype)
                out = self.lvlm(batch, input_ids.to(self._device), attention.to(self._device), image_mask)
                logprobs = -token_cross_entropy(out.logits, out.targets, out.loss_mask).double().cpu()
                greedy = (out.logits.argmax(dim=-1) == out.targets).cpu()
                for row, i in enumerate(chunk):
                    ids, k = seqs[i]
                    span = slice(len(ids) - 1 - k, len(ids) - 1)  # logits[t] predicts ids[t + 1]
                    results[i] = (logprobs[row, span].tolist(), bool(greedy[row, span].all()))
        return results

    def _sequence(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[list[int], int]:
        """``[BOS] context continuation`` (context cut from the left to fit ``max_length``) and the
        number of continuation ids at its end."""
        if self.max_length is not None:
            room = self.max_length - 1 - len(continuation_ids)
            if room < 0:
                raise ValueError(
                    f"a continuation of {len(continuation_ids)} ids does not fit max_length={self.max_length} "
                    "(with BOS): raise max_length"
                )
            context_ids = context_ids[len(context_ids) - room :] if room else []
        return [self.bos_id, *context_ids, *continuation_ids], len(continuation_ids)

    def _as_output(self, logprobs: list[float], greedy: bool) -> tuple[float, bool]:
        total = math.fsum(logprobs)
        if self.score == "sum_logprob":
            return total, greedy
        return (-total / len(logprobs) if logprobs else 0.0), greedy

    def _check_greedy(self, gen_kwargs: dict[str, Any]) -> None:
        sampling = float(gen_kwargs.get("temperature") or 0) > 0 or bool(gen_kwargs.get("do_sample"))
        if sampling or int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once(
                "greedy",
                f"--model prior decodes greedily; ignoring temperature/do_sample/num_beams in {gen_kwargs}",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _batch_size(value: int | str) -> int:
    """lmms-eval passes ``--batch_size`` as given (an int or a string, possibly ``auto``)."""
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("--model prior has no automatic batch size; using 16 (set batch_size=N)")
        return 16
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


def _device(device: str | None) -> str:
    """``auto`` (or none): this process's GPU (``LOCAL_RANK``) when one is visible, else cpu."""
    if device in (None, "", "auto"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return device


def _preprocessing(
    recorded: dict | None, image_size: int | None, resize: str | None, model: str
) -> tuple[int, str]:
    """``(image_size, resize)``: the model args where given, else what the export records (as
    ``prior-eval``'s ``with_model_preprocessing``); an error when neither says."""
    values = {"image_size": image_size, "resize": resize}
    for key in values:
        if values[key] is None:
            if not recorded or recorded.get(key) is None:
                example = "224" if key == "image_size" else "center_crop"
                raise ValueError(
                    f"{model} does not record the {key} it was trained with (exported before this was saved): "
                    f"give it as a model arg, e.g. --model_args pretrained={model},{key}={example}"
                )
            values[key] = recorded[key]
    if values["resize"] not in RESIZE_MODES:
        raise ValueError(f"resize={values['resize']!r}: choose one of {RESIZE_MODES}")
    return int(values["image_size"]), str(values["resize"])


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any (non-empty) ``until`` string."""
    end = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:end]


# ============================================================================ the local demo task

DATA_FILE = "{name}_{split}.parquet"
GENERATION_METRICS = ("object_recall", "object_precision", "chair_i", "color_hallucination", "bleu4")


def write_demo_task(
    folder: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "test_counter",
    name: str = "prior_demo",
    attributes: Sequence[str] = ("color",),
    limit: int | None = None,
    prompt: str = "",
    max_new_tokens: int = 48,
    seed: int = 0,
) -> list[str]:
    """Write an lmms-eval task folder for ``--include_path`` from a demo-corpus split; return the
    task names (all tagged ``name``, so ``--tasks <name>`` runs them all).

    ``data_dir`` is a demo corpus folder (``prior-demo-data``'s ``out_dir``); its ``split``
    (first ``limit`` samples) becomes ``<name>_<split>.parquet`` (the original image bytes, the
    description, its counterfactual choices and truth objects), read by lmms-eval's ``parquet``
    loader from the task folder (no hub access). Tasks:

    * ``<name>_choice_<attribute>`` per attribute (color, shape, count, position): multiple
      choice between the true description and its one-attribute counterfactuals (in a seeded
      order), metric ``acc``; a sample without such counterfactuals is left out of it;
    * ``<name>_caption``: greedy captioning (``max_new_tokens``), cut to the description as
      ``prior-eval`` does, scored with ``GENERATION_METRICS``.

    ``prompt`` is the text every request gives the model after the image (empty: a captioner's
    own setting).
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    unknown = sorted(set(attributes) - set(CHOICE_ATTRIBUTES))
    if unknown:
        raise ValueError(f"Unknown attributes {unknown}: choose from {CHOICE_ATTRIBUTES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _demo_rows(Path(data_dir) / split, attributes, limit, seed)
    if not rows:
        raise ValueError(f"No usable demo samples in {Path(data_dir) / split}: is it a demo corpus split?")
    features = Features(
        {
            "key": Value("string"),
            "image": ImageFeature(),
            "prompt": Value("string"),
            "description": Value("string"),
            "caption": Value("string"),
            "objects": Value("string"),
            **{f"choices_{a}": List(Value("string")) for a in attributes},
            **{f"answer_{a}": Value("int64") for a in attributes},
        }
    )
    for row in rows:
        row["prompt"] = prompt
    data_file = DATA_FILE.format(name=name, split=split)
    Dataset.from_list(rows, features=features).to_parquet(str(folder / data_file))

    tasks = []
    for attribute in attributes:
        task = f"{name}_choice_{attribute}"
        (folder / f"{task}.yaml").write_text(
            _CHOICE_YAML.format(task=task, tag=name, data_file=data_file, attribute=attribute, module=__name__)
        )
        tasks.append(task)
    task = f"{name}_caption"
    lower_is_better = ("chair_i", "color_hallucination")
    metrics = "".join(
        _METRIC_YAML.format(metric=m, module=__name__, higher="false" if m in lower_is_better else "true")
        for m in GENERATION_METRICS
    )
    (folder / f"{task}.yaml").write_text(
        _CAPTION_YAML.format(
            task=task, tag=name, data_file=data_file, module=__name__, max_new_tokens=max_new_tokens, metrics=metrics
        )
    )
    tasks.append(task)
    return tasks


def _demo_rows(split_dir: Path, attributes: Sequence[str], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """One row per usable sample of a demo split: encoded image, texts, shuffled choices."""
    counter = SkipCounter()
    decoder = SampleDecoder(encode=lambda text: [], counter=counter)
    rows: list[dict[str, Any]] = []
    for raw in raw_samples(resolve_shards(str(split_dir)).urls, counter):
        if limit is not None and len(rows) >= limit:
            break
        sample = decoder.parse(raw)
        if sample is None or not {"objects", "description", "cue_first"} <= sample["meta"].keys():
            continue
        meta = sample["meta"]
        row: dict[str, Any] = {
            "key": sample["key"],
            "image": {"bytes": sample["image_bytes"], "path": None},
            "description": meta["description"],
            "caption": sample["caption"],
            "objects": json.dumps(meta["objects"]),
        }
        rng = random.Random(f"{seed}-{sample['key']}")
        for attribute in attributes:
            others = counterfactual_descriptions(meta, attribute)
            choices = [meta["description"], *others] if others else []
            rng.shuffle(choices)
            row[f"choices_{attribute}"] = choices
            row[f"answer_{attribute}"] = choices.index(meta["description"]) if choices else -1
        rows.append(row)
    return rows


def _has_choices(attribute: str) -> Callable[[Any], Any]:
    """A ``process_docs`` that keeps the docs with counterfactuals of ``attribute``."""

    def keep(dataset: Any) -> Any:
        return dataset.filter(lambda answer: answer >= 0, input_columns=f"answer_{attribute}")

    return keep


def demo_process_docs_color(dataset: Any) -> Any:
    return _has_choices("color")(dataset)


def demo_process_docs_shape(dataset: Any) -> Any:
    return _has_choices("shape")(dataset)


def demo_process_docs_count(dataset: Any) -> Any:
    return _has_choices("count")(dataset)


def demo_process_docs_position(dataset: Any) -> Any:
    return _has_choices("position")(dataset)


def demo_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The sample's image, as decoded from its original bytes."""
    return [doc["image"]]


def demo_caption_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """The generated description (``prior-eval``'s ``demo_description`` cut), its parsed objects and
    the truth, under every generation metric (each aggregates the whole corpus)."""
    prediction = demo_description(results[0])
    payload = {
        "prediction": prediction,
        "objects": parse_description(prediction),
        "truth": json.loads(doc["objects"]),
        "reference": doc["description"],
    }
    return {metric: payload for metric in GENERATION_METRICS}


def _generation_metric(name: str, payloads: list[dict[str, Any]]) -> float:
    if name == "bleu4":
        text = TextMetricAccumulator()
        text.update([p["prediction"] for p in payloads], [p["reference"] for p in payloads])
        return float(text.compute()["bleu4"])
    counts = GenerationCounts()
    counts.update([p["objects"] for p in payloads], [p["truth"] for p in payloads])
    return float(counts.compute()[name])


def demo_aggregate_object_recall(payloads: list[dict[str, Any]]) -> float:
    return _generation_metric("object_recall", payloads)


def demo_aggregate_object_precision(payloads: list[dict[str, Any]]) -> float:
    return _generation_metric("object_precision", payloads)


def demo_aggregate_chair_i(payloads: list[dict[str, Any]]) -> float:
    return _generation_metric("chair_i", payloads)


def demo_aggregate_color_hallucination(payloads: list[dict[str, Any]]) -> float:
    return _generation_metric("color_hallucination", payloads)


def demo_aggregate_bleu4(payloads: list[dict[str, Any]]) -> float:
    return _generation_metric("bleu4", payloads)


_CHOICE_YAML = """\
# Written by prior.eval.lmms.write_demo_task: the true description against its {attribute}
# counterfactuals, scored by likelihood (--model prior: mean NLL per token, the smallest wins).
task: {task}
tag: {tag}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
process_docs: !function {module}.demo_process_docs_{attribute}
doc_to_visual: !function {module}.demo_doc_to_visual
doc_to_text: prompt
doc_to_choice: choices_{attribute}
doc_to_target: answer_{attribute}
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_CAPTION_YAML = """\
# Written by prior.eval.lmms.write_demo_task: greedy captions, cut to the description and scored
# against the image's objects and the reference description.
task: {task}
tag: {tag}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function {module}.demo_doc_to_visual
doc_to_text: prompt
doc_to_target: description
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
process_results: !function {module}.demo_caption_process_results
metric_list:
{metrics}metadata:
  version: 1.0
"""

_METRIC_YAML = """\
  - metric: {metric}
    aggregation: !function {module}.demo_aggregate_{metric}
    higher_is_better: {higher}
"""

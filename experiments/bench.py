"""`make bench`: what PRIOR and the framework cost, each figure a ratio measured side by side.

    python experiments/bench.py                    # CPU size, under 5 minutes on 2 cores
    python experiments/bench.py --device cuda      # GPU size, plus the loss memory and MFU figures

Every ratio compares two things measured in the same process, interleaved (A, B, A, B, ...)
after a warm-up, so a slower moment of the machine hits both alike; the value is the median of
the per-round ratios and the spread their 25th-75th percentiles. The figures:

- ``prior_step``: a training step (forward, loss, backward, AdamW) with PRIOR's sidecar weights
  over the same step with NTP, same model, batch and data;
- ``online/<scheme>``: schemes that run an extra forward pass in the step (the reference LM, or an
  image-free pass) over NTP, beside the FLOP ratio of that extra pass (FLOPs counted by
  ``torch.utils.flop_counter``);
- ``lightning``: a step of ``Trainer.fit`` with the project's callbacks over a plain PyTorch loop
  (same module, optimizer, clipping and batch, no data loading in either);
- ``data/<workers>``: samples/s of the training data pipeline (read, decode, tokenize, join
  sidecars) over the samples/s the PRIOR step consumes;
- ``stage2``: tokens/s of ``prior-weights`` over a raw forward of the same reference model over
  the same captions (tokenized, batched, log-probabilities gathered);
- ``loss/<path>/<vocab>``: the weighted loss from hidden states through the LM head at vocab 32k
  and 128k, time and (GPU) peak memory over a naive fp32 cross-entropy, with the loss and
  gradient differences;
- ``resume/<pos>``: time to the first batch when resuming at 10% and 90% of a data epoch over a
  fresh start;
- ``mfu`` (GPU): model FLOPs utilisation of a ~1B-parameter LVLM training step in bf16.

Writes ``<device>.md`` and ``<device>.json`` under ``--out`` (experiments/results/bench).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from prior.cli.common import build_datamodule, compose_config  # noqa: E402
from prior.data.datamodule import as_collated  # noqa: E402

#: What each size builds and how long it measures. ``cpu`` keeps the whole run under 5 minutes.
SIZES = {
    "cpu": {
        "train": 1536, "shards": 4, "batch": 32, "iters": 12, "warmup": 3,
        "llm": ["llm.config.hidden_size=128", "llm.config.intermediate_size=256", "llm.config.num_hidden_layers=2"],
        "lightning_steps": 12, "lightning_rounds": 3, "data_batches": 12, "stage2_rounds": 3,
        "loss_tokens": 512, "loss_hidden": 256, "loss_iters": 3,
    },
    "cuda": {
        "train": 8192, "shards": 8, "batch": 64, "iters": 30, "warmup": 5,
        "llm": ["llm.config.hidden_size=1024", "llm.config.intermediate_size=2816", "llm.config.num_hidden_layers=8",
                "llm.config.num_attention_heads=16", "llm.config.num_key_value_heads=8",
                "trainer=gpu"],
        "lightning_steps": 40, "lightning_rounds": 3, "data_batches": 40, "stage2_rounds": 3,
        "loss_tokens": 8192, "loss_hidden": 2048, "loss_iters": 10,
    },
}


@dataclass
class Figure:
    name: str
    value: float
    lo: float
    hi: float
    target: str
    meets: bool | None
    detail: str


def rounds_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and 25th/75th percentiles of the per-round ratios num[i] / den[i]."""
    r = sorted(a / b for a, b in zip(num, den, strict=True))
    if len(r) == 1:
        return r[0], r[0], r[0]
    q = statistics.quantiles(r, n=4, method="inclusive")
    return statistics.median(r), q[0], q[2]


def interleaved(fns: dict[str, Callable[[], None]], iters: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, called round-robin ``warmup + iters`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Bench:
    def __init__(self, size: str, device: torch.device, root: Path) -> None:
        self.s = SIZES[size]
        self.size = size
        self.device = device
        self.root = root
        self.figures: list[Figure] = []
        self.notes: list[str] = []
        self.fused_rows: list[int] = []  # extra minimum chunk sizes of the fused loss to time
        self.mfu_batches: list[int] = [16]

    # ---------------------------------------------------------------- workspace

    def compose(self, name: str, overrides: list[str]):  # noqa: ANN201
        logger = [] if name == "weights" else ["logger=csv"]
        return compose_config(name, [f"paths.root_dir={self.root}", f"paths.output_dir={self.root}/runs/{name}",
                                     *logger, *overrides])

    def lvlm_cfg(self, *overrides: str):  # noqa: ANN201
        trainer = [] if self.device.type == "cuda" else ["trainer=cpu"]
        return self.compose("train_lvlm", [*self.s["llm"], *trainer, "backbone=visual_encoder",
                                           f"data.batch_size={self.s['batch']}", "seed=0", *overrides])

    def build_workspace(self) -> None:
        from prior.cli.tokenizer import train_tokenizer
        from prior.cli.train_ref import train_reference
        from prior.cli.weights import compute_weights
        from prior.demo.corpus import CorpusConfig, generate_corpus

        data = self.root / "data" / "demo"
        splits = {"train": {"num_samples": self.s["train"], "num_shards": self.s["shards"]},
                  "val": {"num_samples": 128, "num_shards": 2}}
        generate_corpus(CorpusConfig(seed=0, splits=splits), data)
        train_tokenizer(str(data / "train"), str(data / "tokenizer"), vocab_size=512, min_frequency=2)
        trainer = ["trainer=gpu"] if self.device.type == "cuda" else ["trainer=cpu"]
        # speed does not depend on what the reference learned: a few steps make a valid export
        train_reference(self.compose("train_ref", [*[o for o in self.s["llm"] if o != "trainer=gpu"], *trainer,
                                                    "trainer.max_steps=5", "trainer.val_check_interval=5",
                                                    "trainer.limit_val_batches=1", "data.batch_size=32"]))
        compute_weights(self.compose("weights", ["num_workers=0", "shards=[${paths.data_dir}/demo/train]"]))

    # ---------------------------------------------------------------- figures

    def add(self, name: str, stats: tuple[float, float, float], target: str, meets: bool | None, detail: str) -> None:
        self.figures.append(Figure(name, *stats, target, meets, detail))
        print(f"{name:<28} {stats[0]:8.3f}  [{stats[1]:.3f}, {stats[2]:.3f}]  target {target:<14} "
              f"{'-' if meets is None else ('yes' if meets else 'NO')}  {detail}", flush=True)

    def step_fn(self, module, batch: dict) -> Callable[[], None]:  # noqa: ANN001
        """One training step of ``module`` on ``batch``: forward, loss, backward, AdamW."""
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                r = module._losses(batch)
            (r["objective_sum"] / r["tokens"].clamp(min=1)).backward()
            optimizer.step()

        return step

    def modules(self, variants: dict[str, list[str]]) -> tuple[dict, dict]:
        # one batch for all: PRIOR's, which carries the sidecar log-probabilities
        batch = to_device(next(iter(build_datamodule(self.lvlm_cfg("loss=prior")).train_dataloader())), self.device)
        modules = {}
        for name, overrides in variants.items():
            torch.manual_seed(0)
            modules[name] = instantiate(self.lvlm_cfg(*overrides).model, _recursive_=False).to(self.device).train()
        return modules, batch

    def bench_steps(self) -> float:
        """PRIOR (sidecar) and the online schemes against NTP; returns NTP-step samples/s."""
        from torch.utils.flop_counter import FlopCounterMode

        ref = f"loss.reference={self.root}/artifacts/demo/reference"
        # the logits path everywhere but in the fused pair, so each ratio compares one thing
        logits = "model.fused_loss=false"
        variants = {"ntp": ["loss=ntp", logits], "prior": ["loss=prior", logits],
                    "ntp (fused loss)": ["loss=ntp", "model.fused_loss=true"],
                    "prior (fused loss)": ["loss=prior", "model.fused_loss=true"],
                    "prior_online": ["loss=prior_online", ref, logits],
                    "cal": ["loss=cal", logits], "dpa (online)": ["loss=dpa", ref, logits]}
        modules, batch = self.modules(variants)
        steps = {k: self.step_fn(m, batch) for k, m in modules.items()}
        times = interleaved(steps, self.s["iters"], self.s["warmup"], self.device)
        flops = {}
        for name, fn in steps.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
        ntp = times["ntp"]
        stats = rounds_ratio(times["prior"], ntp)
        self.add("prior_step", stats, "<= 1.02", stats[0] <= 1.02,
                 f"both on the logits path; NTP step {1e3 * statistics.median(ntp):.1f} ms, batch {self.s['batch']}")
        stats = rounds_ratio(times["prior (fused loss)"], times["ntp (fused loss)"])
        self.add("prior_step/fused_loss", stats, "<= 1.02", stats[0] <= 1.02,
                 f"both with the loss from hidden states (model.fused_loss=true); NTP step "
                 f"{1e3 * statistics.median(times['ntp (fused loss)']):.1f} ms")
        for name in ("prior_online", "cal", "dpa (online)"):
            extra = max(flops[name] - flops["ntp"], 0) / flops["ntp"]
            stats = rounds_ratio(times[name], ntp)
            limit = 1 + extra + 0.05
            self.add(f"online/{name}", stats, f"<= {limit:.3f}", stats[0] <= limit,
                     f"extra-pass FLOP ratio {extra:.3f}")
        return self.s["batch"] / statistics.median(times["prior"])

    def bench_lightning(self) -> None:
        """A step of Trainer.fit (the project's trainer and callbacks) against a plain loop."""
        import lightning as L

        from prior.cli.common import build_trainer

        cfg = self.lvlm_cfg("loss=prior", "trainer.enable_progress_bar=false", "trainer.val_check_interval=null",
                            "trainer.limit_val_batches=0", "trainer.check_val_every_n_epoch=null",
                            "checkpoint_every=null", f"trainer.max_steps={self.s['lightning_steps']}",
                            "trainer.log_every_n_steps=10")
        torch.manual_seed(0)
        batch = next(iter(build_datamodule(cfg).train_dataloader()))
        module = instantiate(cfg.model, _recursive_=False)
        n = self.s["lightning_steps"]

        class Stamps(L.Callback):
            def __init__(self) -> None:
                self.t: list[float] = []

            def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
                sync(module.device)
                self.t.append(time.perf_counter())

        def lightning_round() -> list[float]:
            stamps = Stamps()
            trainer = build_trainer(cfg)
            trainer.callbacks.append(stamps)
            loader = torch.utils.data.DataLoader([batch] * n, batch_size=None, collate_fn=as_collated)
            trainer.fit(module, train_dataloaders=loader)
            return [b - a for a, b in zip(stamps.t, stamps.t[1:])]

        def plain_round() -> list[float]:
            module.to(self.device).train()
            opt = module.configure_optimizers()
            optimizer = opt["optimizer"] if isinstance(opt, dict) else opt
            scheduler = opt["lr_scheduler"]["scheduler"] if isinstance(opt, dict) else None
            dev = to_device(batch, self.device)
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                        else contextlib.nullcontext())
            stamps = []
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                dev_batch = to_device(batch, self.device) if self.device.type == "cuda" else dev
                with autocast:
                    r = module._losses(dev_batch)
                (r["objective_sum"] / r["tokens"].clamp(min=1)).backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                sync(self.device)
                stamps.append(time.perf_counter())
            return [b - a for a, b in zip(stamps, stamps[1:])]

        lightning, plain = [], []
        for _ in range(self.s["lightning_rounds"]):
            lightning.append(statistics.median(lightning_round()[2:]))
            plain.append(statistics.median(plain_round()[2:]))
        stats = rounds_ratio(lightning, plain)
        self.add("lightning", stats, "<= 1.05", stats[0] <= 1.05,
                 f"plain step {1e3 * statistics.median(plain):.1f} ms; median step of {n} per round, "
                 f"{len(plain)} rounds")

    def bench_data(self, consumed_per_s: float) -> None:
        """Training-pipeline samples/s at 0 and 2 workers against what the PRIOR step consumes."""
        for workers in (0, 2):
            cfg = self.lvlm_cfg("loss=prior", f"data.num_workers={workers}")
            rates = []
            for _ in range(3):
                loader = build_datamodule(cfg).train_dataloader()
                it = iter(loader)
                next(it)  # worker start-up and the first decode are not throughput
                start, samples = time.perf_counter(), 0
                for _, b in zip(range(self.s["data_batches"]), it):
                    samples += b["input_ids"].shape[0]
                rates.append(samples / (time.perf_counter() - start))
                del it
            rate = statistics.median(rates)
            ratio = rate / consumed_per_s
            self.add(f"data/{workers}_workers", (ratio, min(rates) / consumed_per_s, max(rates) / consumed_per_s),
                     ">= 3", ratio >= 3, f"{rate:.0f} samples/s vs {consumed_per_s:.0f} consumed (min-max of 3)")

    def bench_stage2(self) -> None:
        """prior-weights tokens/s against a raw forward of the same model over the same captions."""
        import webdataset as wds

        from prior.cli.weights import compute_weights
        from prior.models.reference import load_reference

        wcfg = self.compose("weights", ["shards=[${paths.data_dir}/demo/train]"])  # its default workers
        if self.device.type == "cuda":
            wcfg.trainer.accelerator = "gpu"
        ref_dir = str(wcfg.reference)
        tokenizer_dir = self.root / "data" / "demo" / "tokenizer"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        captions = []
        for shard in sorted((self.root / "data" / "demo" / "train").glob("*.tar")):
            captions += [s["txt"].decode() for s in wds.WebDataset(str(shard), shardshuffle=False)]
        model = load_reference(ref_dir).to(self.device).eval()
        mb = int(wcfg.micro_batch_size)
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

        def raw() -> int:
            """Tokenize, sort by length (as stage 2 does within a shard), batch, forward, gather."""
            tokens = 0
            enc_all = sorted(([bos, *tok(c, add_special_tokens=False)["input_ids"]][: int(wcfg.max_length)]
                              for c in captions), key=len)
            with torch.no_grad():
                for i in range(0, len(enc_all), mb):
                    enc = enc_all[i:i + mb]
                    width = max(map(len, enc))
                    ids = torch.zeros(len(enc), width, dtype=torch.long)
                    mask = torch.zeros(len(enc), width, dtype=torch.long)
                    for j, e in enumerate(enc):
                        ids[j, :len(e)] = torch.tensor(e)
                        mask[j, :len(e)] = 1
                    ids, mask = ids.to(self.device), mask.to(self.device)
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                    logp.masked_fill_(~mask[:, 1:].bool(), 0.0).cpu()
                    tokens += int(mask[:, 1:].sum())
            return tokens

        shards = sorted(str(p) for p in (self.root / "data" / "demo" / "train").glob("*.tar"))
        half = self.compose("weights", [f"shards=[{','.join(shards[: len(shards) // 2])}]"])
        half.trainer = wcfg.trainer

        def scored(cfg, r: int) -> tuple[int, float]:  # noqa: ANN001
            cfg.sidecar_dir = str(self.root / f"sidecars_{r}_{id(cfg)}")
            sync(self.device)
            start = time.perf_counter()
            summary = compute_weights(cfg)
            sync(self.device)
            return summary["tokens"], time.perf_counter() - start

        stage2, marginal, raw_rates = [], [], []
        for r in range(self.s["stage2_rounds"]):
            tokens, seconds = scored(wcfg, r)
            half_tokens, half_seconds = scored(half, r)
            stage2.append(tokens / seconds)
            marginal.append((tokens - half_tokens) / max(seconds - half_seconds, 1e-9))
            sync(self.device)
            start = time.perf_counter()
            n = raw()
            sync(self.device)
            raw_rates.append(n / (time.perf_counter() - start))
        stats = rounds_ratio(stage2, raw_rates)
        self.add("stage2", stats, ">= 0.9", stats[0] >= 0.9,
                 f"{statistics.median(stage2):.0f} vs raw {statistics.median(raw_rates):.0f} tokens/s over "
                 f"{len(captions)} captions, start-up included")
        stats = rounds_ratio(marginal, raw_rates)
        self.add("stage2/marginal", stats, ">= 0.9", stats[0] >= 0.9,
                 f"{statistics.median(marginal):.0f} tokens/s of the second half of the shards "
                 "(all shards minus half of them: what a large corpus sees)")

    def bench_loss(self) -> None:
        """The weighted loss from hidden states through the LM head, against naive fp32 CE."""
        from prior import loss as L

        n, d, gpu = self.s["loss_tokens"], self.s["loss_hidden"], self.device.type == "cuda"
        dtype = torch.bfloat16 if gpu else torch.float32
        fused = getattr(L, "linear_token_cross_entropy", None)
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        for vocab in (32000, 128256):
            g = torch.Generator().manual_seed(0)
            hidden = (torch.randn(n, d, generator=g)).to(self.device, dtype)
            weight = (torch.randn(vocab, d, generator=g) * d ** -0.5).to(self.device, dtype)
            targets = torch.randint(0, vocab, (n,), generator=g).to(self.device)
            coef = torch.rand(n, generator=g).to(self.device)
            coef = coef * n / coef.sum()

            def naive(h, w):  # noqa: ANN001, ANN202
                ce = F.cross_entropy((h @ w.T).float(), targets, reduction="none")
                return (coef * ce).sum()

            def chunked_logits(h, w):  # noqa: ANN001, ANN202
                logits = (h @ w.T)[None]
                ce = L.token_cross_entropy(logits, targets[None], torch.ones_like(targets[None], dtype=torch.bool))
                return (coef * ce[0]).sum()

            paths = {"naive": naive, "chunked_logits": chunked_logits}
            # torch's chunked linear cross-entropy runs 6-30x slower than naive on a CPU: GPU only
            if gpu and options is not None and hasattr(F, "linear_cross_entropy"):
                paths["torch_linear_ce"] = lambda h, w: (coef * F.linear_cross_entropy(
                    h, w, targets, reduction="none", options=options()).float()).sum()
            if fused is not None:
                paths["fused"] = lambda h, w: fused(h, w, targets, coef)[0]
                for rows in self.fused_rows:
                    paths[f"fused_{rows}rows"] = (lambda r: lambda h, w: fused(h, w, targets, coef, min_chunk_rows=r)[0])(rows)
            results = {k: self._measure_loss(fn, hidden, weight) for k, fn in paths.items()}
            base = results["naive"]
            for name, r in results.items():
                if name == "naive":
                    continue
                t = rounds_ratio(r["times"], base["times"])
                mem = r["peak"] / base["peak"] if gpu else float("nan")
                dl = abs(r["loss"] - base["loss"]) / abs(base["loss"])
                dg = max((a - b).abs().max().item() / b.abs().max().clamp(min=1e-30).item()
                         for a, b in zip(r["grads"], base["grads"]))
                meets = (t[0] <= 1.1 and mem <= 0.3) if gpu else None
                self.add(f"loss/{name}/{vocab // 1000}k", t, "time <= 1.1, mem <= 0.3", meets,
                         f"memory {mem:.2f}x naive ({r['peak']:.0f} vs {base['peak']:.0f} MiB), "
                         f"rel. loss diff {dl:.1e}, rel. grad diff {dg:.1e}" if gpu else
                         f"time only on CPU; rel. loss diff {dl:.1e}, rel. grad diff {dg:.1e}")

    def _measure_loss(self, fn, hidden, weight) -> dict:  # noqa: ANN001
        gpu = self.device.type == "cuda"
        times, peak = [], 0.0
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        for i in range(2 + self.s["loss_iters"]):
            h.grad = w.grad = None
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            sync(self.device)
            start = time.perf_counter()
            loss = fn(h, w)
            loss.backward()
            sync(self.device)
            if i >= 2:
                times.append(time.perf_counter() - start)
                if gpu:
                    # beyond the inputs and the parameter gradient every path must hold
                    extra = torch.cuda.max_memory_allocated(self.device) - base - w.numel() * w.element_size()
                    peak = max(peak, extra / 2**20)
        return {"times": times, "peak": peak, "loss": float(loss), "grads": [h.grad.float(), w.grad.float()]}

    def bench_resume(self) -> None:
        """Time to the first batch when resuming at 10% and 90% of a data epoch vs a fresh start."""
        cfg = self.lvlm_cfg("loss=prior")
        dm = build_datamodule(cfg)
        per_epoch = len(dm.train_dataloader())
        layout = dm.layout()

        def first_batch(done: int) -> Callable[[], None]:
            def run() -> None:
                fresh = build_datamodule(cfg)
                if done:
                    fresh.load_state_dict({"epoch": 0, "batches_done": done, "layout": layout})
                next(iter(fresh.train_dataloader()))
            return run

        positions = {"0%": 0, "10%": max(1, per_epoch // 10), "90%": per_epoch * 9 // 10}
        times = interleaved({k: first_batch(v) for k, v in positions.items()}, 5, 1, torch.device("cpu"))
        skipped = (positions["90%"] - positions["10%"]) * self.s["batch"]
        per_sample = (statistics.median(times["90%"]) - statistics.median(times["10%"])) / skipped
        for pos in ("10%", "90%"):
            stats = rounds_ratio(times[pos], times["0%"])
            self.add(f"resume/{pos}", stats, "<= 1.1 (flat)", stats[0] <= 1.1,
                     f"batch {positions[pos]} of {per_epoch}: {1e3 * statistics.median(times[pos]):.0f} ms vs "
                     f"{1e3 * statistics.median(times['0%']):.0f} ms fresh; {1e6 * per_sample:.0f} us per skipped sample")

    def bench_mfu(self) -> None:
        """MFU of a ~1B-parameter visual-encoder LVLM (ViT-B/16 at 224 px, a 0.9B Llama) in bf16."""
        from prior.models.lvlm import build_lvlm

        llm = {"model_type": "llama", "dtype": "float32", "attn_implementation": "sdpa",
               "config": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
                          "num_key_value_heads": 16, "intermediate_size": 5632, "vocab_size": 32000,
                          "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2}}
        backbone = {"name": "visual_encoder", "timm_name": "vit_base_patch16_224", "pretrained": False,
                    "timm_kwargs": {}, "feature_layer": -2, "projector_depth": 2}
        model = build_lvlm(backbone, llm, None).to(self.device).train()
        params = sum(p.numel() for p in model.parameters())
        for bsz in self.mfu_batches:
            self._mfu_at(model, params, bsz)

    def _mfu_at(self, model, params: int, bsz: int) -> None:  # noqa: ANN001
        from torch.utils.flop_counter import FlopCounterMode

        from prior.loss import effective_weights, token_cross_entropy, token_weights

        length = 128
        g = torch.Generator().manual_seed(0)
        batch = {"images": torch.rand(bsz, 3, 224, 224, generator=g),
                 "input_ids": torch.randint(3, 32000, (bsz, length), generator=g),
                 "attention_mask": torch.ones(bsz, length, dtype=torch.bool),
                 "ref_logprobs": -torch.rand(bsz, length - 1, generator=g)}
        batch["input_ids"][:, 0] = 1
        batch = to_device(batch, self.device)
        # the module's loss path (LVLMModule._losses with loss=prior), on a synthetic batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
            ce = token_cross_entropy(out.logits, out.targets, out.loss_mask)
            w = effective_weights(token_weights(batch["ref_logprobs"]), out.loss_mask)
            ((w * ce).sum() / out.loss_mask.sum()).backward()
            optimizer.step()

        from prior.loss import linear_token_cross_entropy

        def fused_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch["images"], batch["input_ids"], batch["attention_mask"], hidden=True)
                w = effective_weights(token_weights(batch["ref_logprobs"]), out.loss_mask)
                m = out.loss_mask
                objective, _ = linear_token_cross_entropy(out.hidden[m], model.head_weight, out.targets[m], w[m])
            (objective / m.sum()).backward()
            optimizer.step()

        from prior.callbacks import peak_flops

        name = torch.cuda.get_device_name(self.device)
        peak = peak_flops(self.device, "bf16-mixed")
        if peak is None:
            self.notes.append(f"MFU: no bf16 peak known for {name}")
            return
        for label, fn in (("mfu", step), ("mfu/fused_loss", fused_step)):
            for _ in range(3):
                fn()
            with FlopCounterMode(display=False) as counter:
                step()  # the model's FLOPs: the same for both loss paths
            flops = counter.get_total_flops()
            times = interleaved({"step": fn}, 10, 2, self.device)["step"]
            mfu = sorted(flops / t / peak for t in times)
            q = statistics.quantiles(mfu, n=4, method="inclusive")
            self.add(f"{label}/batch{bsz}", (statistics.median(mfu), q[0], q[2]), ">= 0.40",
                     statistics.median(mfu) >= 0.40,
                     f"{params / 1e9:.2f}B params, batch {bsz} x (196 image + {length} text) tokens, "
                     f"{flops / 1e12:.1f} TFLOP/step, {1e3 * statistics.median(times):.0f} ms/step, "
                     f"peak {peak / 1e12:.0f} TFLOP/s, {torch.cuda.max_memory_allocated(self.device) / 2**30:.0f} GiB peak memory")

    # ---------------------------------------------------------------- report

    def hardware(self) -> dict:
        info = {"device": self.device.type, "torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count()}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        with contextlib.suppress(Exception):
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()
        return info

    def report(self, command: str, seconds: float) -> str:
        hw = self.hardware()
        where = hw.get("gpu") or f"{hw['cores']} CPU cores ({hw['cpu']}), {hw['threads']} torch threads"
        lines = [f"# `make bench` on {where}", "",
                 f"`{command}` - torch {hw['torch']}, commit {hw.get('commit', '?')}, {seconds:.0f} s. Each value "
                 "is the median of per-round ratios measured side by side in one process; [25%, 75%] their spread.",
                 "", "| figure | ratio | spread | target | meets | detail |", "|---|---|---|---|---|---|"]
        for f in self.figures:
            meets = "-" if f.meets is None else ("yes" if f.meets else "**no**")
            lines.append(f"| `{f.name}` | {f.value:.3f} | [{f.lo:.3f}, {f.hi:.3f}] | {f.target} | {meets} | {f.detail} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        lines += ["", "Why a figure misses its target, and what fixing it would cost: [README.md](README.md)."]
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench"))
    parser.add_argument("--only", default="", help="comma-separated sections: steps,lightning,data,stage2,loss,resume,mfu")
    parser.add_argument("--fused-rows", default="", help="also time the fused loss with these minimum chunk rows")
    parser.add_argument("--mfu-batch", default="16", help="batch sizes of the MFU figure")
    a = parser.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU.")
    only = set(filter(None, a.only.split(",")))
    if "data" in only:
        only.add("steps")  # the data figure is over what the step consumes
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="prior-bench-") as tmp:
        bench = Bench(a.device, device, Path(tmp))
        bench.fused_rows = [int(r) for r in a.fused_rows.split(",") if r]
        bench.mfu_batches = [int(b) for b in a.mfu_batch.split(",") if b]
        if not only or only - {"loss", "mfu"}:  # those two build their own inputs
            bench.build_workspace()
            print(f"workspace built in {time.time() - start:.0f} s", flush=True)
        consumed = None

        def section(name: str, fn: Callable[..., object], *args: object) -> object:
            """Run one section; a failure becomes a note and the others still run."""
            if only and name not in only:
                return None
            began = time.time()
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                bench.notes.append(f"section `{name}` failed: {type(e).__name__}: {str(e)[:300]}")
                return None
            finally:
                print(f"[{name}: {time.time() - began:.0f} s]", flush=True)
                save(bench, a, start)

        consumed = section("steps", bench.bench_steps)
        section("lightning", bench.bench_lightning)
        if consumed:
            section("data", bench.bench_data, consumed)
        section("stage2", bench.bench_stage2)
        section("loss", bench.bench_loss)
        section("resume", bench.bench_resume)
        if device.type == "cuda":
            section("mfu", bench.bench_mfu)
    print(save(bench, a, start))
    return 0


def save(bench: Bench, a: argparse.Namespace, start: float) -> str:
    """Write the table and the JSON so far (after every section: a run cut short keeps its figures)."""
    command = "python experiments/bench.py" + (f" --device {a.device}" if a.device != "cpu" else "")
    report = bench.report(command, time.time() - start)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.device}.md").write_text(report)
    (out / f"{a.device}.json").write_text(json.dumps(
        {"hardware": bench.hardware(), "command": command, "seconds": round(time.time() - start, 1),
         "figures": [asdict(f) for f in bench.figures], "notes": bench.notes}, indent=1))
    return report


if __name__ == "__main__":
    raise SystemExit(main())

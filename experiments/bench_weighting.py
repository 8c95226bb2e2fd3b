"""Step time of every token-weighting scheme relative to NTP, measured side by side in one process.

Each scheme's LVLM module is built from the same experiment config (``loss=<scheme>``, same seed,
so the same weights) and times a full training step on the same batch: forward, the scheme's
extra passes (the reference LM for ``prior_online``, the image-free pass for ``cal``, the json
for ``oracle``), the weighted loss and backward. The schemes are timed round-robin, so a slower
machine moment hits all of them alike; the table reports the median and the ratio to NTP.

    python experiments/bench_weighting.py                          # demo setting U, CPU
    python experiments/bench_weighting.py --experiment demo_h --iters 20
    python experiments/bench_weighting.py --device cuda --experiment smollm2_u

Needs the demo corpus, its weights and the reference LM (``make weights``), or the data and
reference that the experiment names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prior.cli.common import build_datamodule, compose_config  # noqa: E402
from prior.weighting import SCHEMES  # noqa: E402


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def extra_work(weighting) -> str:  # noqa: ANN001
    """What a scheme adds to an NTP step, in words."""
    parts = []
    if "reference" in weighting.needs:
        parts.append("reference LM forward" if weighting.reference else "sidecar log-probs (no compute)")
    if "text_only" in weighting.needs:
        parts.append("image-free LVLM forward (no grad)")
    if "visual" in weighting.needs:
        parts.append("token kinds from the json (Python)")
    return ", ".join(parts) or "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="demo_u")
    parser.add_argument("--schemes", default=",".join(SCHEMES), type=lambda s: s.split(","))
    parser.add_argument("--online", default="rho,dpa", type=lambda s: [x for x in s.split(",") if x],
                        help="schemes also timed with the reference LM run inside the step (loss.reference)")
    parser.add_argument("--reference", default="${paths.artifacts_dir}/demo/reference",
                        help="the reference LM folder for the online variants")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=str(ROOT), help="the folder holding data/ and artifacts/")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every scheme")
    a = parser.parse_args(argv)
    device = torch.device(a.device)
    if "ntp" not in a.schemes:
        a.schemes.insert(0, "ntp")
    common = [f"experiment={a.experiment}", f"paths.root_dir={a.root}", "paths.output_dir=/tmp/bench_weighting", *a.overrides]
    variants = {s: [f"loss={s}"] for s in a.schemes}
    reference = f"loss.reference={a.reference}"
    variants.update({f"{s} (online)": [f"loss={s}", reference] for s in a.online})
    modules, batches = {}, {}
    for scheme, overrides in variants.items():
        torch.manual_seed(0)
        cfg = compose_config("train_lvlm", [*common, *overrides])
        dm = build_datamodule(cfg)
        batches[scheme] = to_device(next(iter(dm.train_dataloader())), device)
        modules[scheme] = instantiate(cfg.model, _recursive_=False).to(device).train()
    times: dict[str, list[float]] = {s: [] for s in variants}
    for step in range(a.warmup + a.iters):
        for scheme, module in modules.items():
            module.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            module._losses(batches[scheme])["objective_sum"].backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= a.warmup:
                times[scheme].append(1e3 * (time.perf_counter() - start))
    ntp = statistics.median(times["ntp"])
    batch = batches["ntp"]["input_ids"].shape[0]
    print(f"experiment={a.experiment}, batch {batch}, {a.device}, {torch.get_num_threads()} thread(s), "
          f"median of {a.iters} steps after {a.warmup} warm-up")
    print(f"{'scheme':<16} {'step ms':>9} {'vs NTP':>7}  extra work")
    for scheme in variants:
        ms = statistics.median(times[scheme])
        print(f"{scheme:<16} {ms:>9.1f} {ms / ntp:>6.2f}x  {extra_work(modules[scheme].weighting)}")


if __name__ == "__main__":
    main()

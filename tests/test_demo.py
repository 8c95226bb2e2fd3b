from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_tiny_end_to_end_then_the_notebook_runs(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        ["make", "-C", str(REPO), "demo", "DEMO_SIZE=tiny", f"ARGS=paths.root_dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    assert "| test_counter/choice_accuracy_color |" in out
    # a smoke-size demo learns nothing, so NTP fails the validity gate and no average is reported
    assert "Invalid under the validity gate" in out and "average relative change" not in out
    assert "| test_counter/nll_color_counter |" in out and "steps to 0.5" in out
    assert "Validity gate" in out and "Demo finished in" in out
    run = next((tmp_path / "logs" / "demo" / "runs").iterdir())
    for name in ("results.md", "curves.png", "scaling.png", "lvlm_ntp/eval_curve.jsonl", "lvlm_prior/export/model.safetensors"):
        assert (run / name).exists(), name
    assert (tmp_path / "artifacts" / "demo" / "token_weights.html").exists()
    for part in ("base", "reference"):  # the pre-trained parts, with their cache keys
        assert (tmp_path / "artifacts" / "demo" / part / "prior_stage.json").exists(), part
    assert (tmp_path / "data" / "demo" / "train" / "manifest.json").exists()  # all under paths.root_dir

    notebook = nbformat.read(REPO / "notebooks" / "prior_demo.ipynb", as_version=4)
    os.environ["PRIOR_DEMO_ROOT"] = str(tmp_path)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["PRIOR_DEMO_ROOT"]
    cell_outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    outputs = "".join(o.get("text", "") for o in cell_outputs)
    assert "demo run:" in outputs and "PRIOR vs NTP: invalid under the validity gate" in outputs
    assert all(o.get("output_type") != "error" for o in cell_outputs)
    displays = [o["data"] for o in cell_outputs if o.get("output_type") == "display_data"]
    # the pictures: counter-prior images with both models' captions, the weights, the learning curves
    assert sum("image/png" in d for d in displays) >= 3
    # the captions both exported LVLMs generated for each counter-prior image, beside its truth
    for label in ("truth:", "NTP caption:", "PRIOR caption:"):
        assert outputs.count(label) == 3, label
    # a caption shaded token by token with its stage-2 weights (read from the sidecars)
    shaded = next(d["text/html"] for d in displays if "text/html" in d)
    assert shaded.count("<span") > 10 and "background: rgba(220,40,90," in shaded
    assert "mean weight of this caption's tokens" in outputs


def test_a_cached_part_is_trained_again_only_when_its_config_changes(tmp_path):
    from prior.cli.common import compose_config
    from prior.cli.demo import cached_part

    calls = []

    def train(cfg):  # stands in for a training entry point: records the call, exports a folder
        calls.append(cfg.optimizer.lr)
        Path(cfg.export_dir).mkdir(parents=True, exist_ok=True)
        return {"val/ppl": 1.0}

    def cfg(*overrides):
        return compose_config("train_base", [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides])

    first = cached_part(cfg(), "tok", train, fresh=False)
    assert cached_part(cfg(), "tok", train, fresh=False) == first and len(calls) == 1  # cached
    assert cached_part(cfg("optimizer.lr=0.5"), "tok", train, fresh=False) != first and len(calls) == 2
    cached_part(cfg("optimizer.lr=0.5"), "other tokenizer", train, fresh=False)  # an upstream part changed
    cached_part(cfg("optimizer.lr=0.5"), "other tokenizer", train, fresh=True)
    assert len(calls) == 4

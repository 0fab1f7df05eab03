# fatesim — every target installs what it needs into .venv first (torch's CPU build before anything else).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FATESIM := $(BIN)/fatesim
TRACES := traces/data
PROMPTS := traces/prompts/default.jsonl
MAX_NEW_TOKENS ?= 32
export PYTHONHASHSEED := 0

.PHONY: install demo test lint trace models bench bench-real bench-scale calibrate validate gpu-wheels gpu-check reproduce clean

$(STAMP): pyproject.toml setup.py sim/kernel/compiled.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an open range would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check sim traces realrun calibration tests

$(TRACES)/%.safetensors: $(STAMP) $(PROMPTS) traces/models/%/model.safetensors
	mkdir -p $(TRACES)
	OMP_NUM_THREADS=1 $(FATESIM) trace record --model $* --prompts $(PROMPTS) --out $@ --max-new-tokens $(MAX_NEW_TOKENS) --lookahead 2 --gate-inputs

trace: $(TRACES)/mini-qwen-moe.safetensors $(TRACES)/mini-deepseek-moe.safetensors

# The main job: Qwen1.5-MoE-A2.7B shapes on the Fate paper's RTX 3090 at a budget where a quarter of the
# routed experts fit (about the paper's 11 GB under Fate's accounting), with the routing of the embedded
# mini-qwen-moe model, on both kinds of profile: the efficient-engine bound (datasheet roofline) and the
# Hugging Face eager engine the Fate paper measured (fitted to its figures: `fatesim reproduce fate`).
DEMO_POLICIES := lod,lru,eap,fate,oracle,oracle:precision=fate-hybrid

demo: $(TRACES)/mini-qwen-moe.safetensors
	$(FATESIM) trace info $<
	@echo "== efficient-engine bound (rtx3090-bound): what the hardware allows =="
	$(FATESIM) compare --trace $< --as-model qwen1.5-moe-a2.7b --hw rtx3090-bound --memory-budget 25% \
		--policies $(DEMO_POLICIES)
	@echo "== the engine the Fate paper measured (rtx3090-hf-eager): HF eager, per-layer and per-expert software costs =="
	$(FATESIM) compare --trace $< --as-model qwen1.5-moe-a2.7b --hw rtx3090-hf-eager --memory-budget 25% \
		--policies $(DEMO_POLICIES)

bench: $(STAMP)
	$(BIN)/python -m sim.bench --repeat 5 --phases

# realrun against accelerate's offloading on a generated model with Qwen1.5-MoE expert shapes (needs ~9 GB free).
bench-real: $(STAMP)
	mkdir -p bench
	$(BIN)/python -m realrun.bench --out bench/realrun-$$(hostname -s).json

# realrun (lod, lru, fate, as `fatesim realrun` subprocesses: peak RSS, wall time, tokens/s, slow-tier bytes)
# and the streaming `trace record` on full-size random checkpoints (realrun/checkpoint_gen.py) generated into
# $FATESIM_CACHE/scale (~/.cache/fatesim/scale) and deleted afterwards. Qwen1.5-MoE-A2.7B is 28.6 GB on disk
# (DeepSeekMoE-16B's substitute 32.4 GB): SCALE_MODELS=qwen1.5-moe-a2.7b,deepseek-moe-16b-as-deepseek-v2 runs
# both, one after the other. One torch thread per run: on a small shared machine OpenMP workers that get
# descheduled make the many small ops of quantised experts 5-20x slower (fate decoded 0.13 tok/s with two
# threads under load, 1.06 with one). SCALE_ARGS="--dtype bfloat16" for the bf16 compute figures.
SCALE_MODELS ?= qwen1.5-moe-a2.7b
SCALE_ARGS ?=

bench-scale: $(STAMP)
	mkdir -p bench
	$(BIN)/python -m realrun.bench_scale --models $(SCALE_MODELS) --threads 1 --delete-after \
		--out bench/scale-$$(hostname -s).json $(SCALE_ARGS)

# Measure this machine (CPU, O_DIRECT disk tier, realrun's Qwen-shaped bench model) into a profile, then
# check the simulator against realrun on it. Outputs go to out/ (not tracked).
PROFILE := out/this-machine-cpu-disk.toml

$(PROFILE): $(STAMP)
	mkdir -p out
	$(FATESIM) calibrate --device cpu --store disk --model bench --out $@ --plots out/calibration-plots

calibrate: $(PROFILE)

validate: $(PROFILE)
	$(FATESIM) validate --profile $(PROFILE) --model bench --num-prompts 2 --max-new-tokens 8 --link observed

# Every check that needs a CUDA GPU, once, in at most 8 minutes, into one folder to commit (pytest -m cuda,
# realrun bit-equal to transformers on CUDA, calibrate --device cuda, validate --device cuda, the full-size
# run): see calibration/gpu_check.py. The GPU machine has python3 with torch but no package registry, so
# `make gpu-wheels` (here) puts the missing pure-Python wheels into .whl/; gpu-check installs them from there.
GPU_PY ?= python3
GPU_OUT ?= gpu-check/$(shell date -u +%Y%m%dT%H%M%SZ)
GPU_SITE ?= /tmp/fatesim-site
GPU_WHEELS := simpy==4.1.2 tomli_w==1.2.0 termcolor==3.3.0 transformers==5.24.0

gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl hqq==0.2.8.post1  # an sdist only; pure Python

gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	# the simulator's C kernel for this Python (without it the simulator replays in its reference engine)
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) setup.py -q build_ext --inplace || echo "gpu-check: the C kernel did not build"
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PY) -m calibration.gpu_check --out $(GPU_OUT) $(GPU_ARGS)

# The Fate paper's grid, Speculating Experts and LRC beside the papers' tables (traces recorded once, cached).
reproduce: $(STAMP)
	$(FATESIM) reproduce fate
	$(FATESIM) reproduce speculate
	$(FATESIM) reproduce lrc

models: $(STAMP)
	$(BIN)/python -m traces.train_models --model all --threads 1

clean:
	rm -rf $(TRACES) .pytest_cache .ruff_cache

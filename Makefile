# The one environment is .venv at the repository root; every target builds it if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install

.PHONY: setup data demo lint test test-slow test-explore parity bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone: pip takes these exact wheels from the local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy==1.26.4
	$(PY) -m pip install -q -e '.[torch,mindspore,onnx,serve,dev]'
	@$(MAKE) --no-print-directory data
	touch $@

# The embedded default data set: Debian's dataset-fashion-mnist, installed when missing and apt is usable.
FMNIST_DIR := /usr/share/datasets/fashion-mnist
data:
	@test -d $(FMNIST_DIR) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)); } || \
		echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'apt-get install dataset-fashion-mnist', or pass --data-dir DIR holding the four IDX files"

demo: setup
	$(VENV)/bin/dvt demo

# Two test processes, one core and one thread each (-rs lists why each skipped test was skipped: the GPU and
# Ascend targets where none is found): two single-threaded processes keep both cores
# busy through MindSpore's graph compiles, which one process runs on one core. Tests go out file by
# file, so a module's fixtures (models, exported graphs, compiled stages) are built once.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n 2 --dist loadfile
# The parity bounds are checked once more under a second kernel family (AVX2 ATen, MKL and oneDNN
# kernels: other blockings, other summation orders), so that a bound read off one CPU fails on this one first.
SECOND_KERNELS := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
KERNEL_TESTS := tests/test_backend_ops.py parity_tests/test_logits.py parity_tests/test_train_step.py

# Tests marked slow stay out of make test to keep it within 15 minutes on 2 cores; the parity files,
# the longest, go out first so that no worker idles at the end.
test: setup lint
	$(PYTEST) -m "not slow" parity_tests tests
	$(SECOND_KERNELS) $(PYTEST) -m "not slow" $(KERNEL_TESTS)

test-slow: setup
	$(PYTEST) -m slow tests parity_tests

# Style and static checks (pyflakes, pycodestyle, import order, bugbear; pyproject.toml's [tool.ruff]), and the
# architecture's import contracts (pyproject.toml's [tool.importlinter]: layers, no framework in dvt_shared and
# dvt_onnx, independent backends, no import circles).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Property tests with fresh random examples (make test replays a fixed set).
test-explore: setup
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q -p no:cacheprovider tests/test_properties.py tests/test_exit_policy.py

parity: setup
	$(PY) -m pytest -q -rs parity_tests

bench: setup
	$(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out

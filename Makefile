# keras_transfer developer targets. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install assets lint format test test-fast demo clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so `make test` stays idempotent and quick.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "tensorflow-serving-api==2.21.0"
	touch $(STAMP)

# Offline assets the tests and the demo use (real ImageNet weights, a real dataset); filled in by the
# main-job work. Idempotent: does nothing when they are already present.
assets: install
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "Installing Debian package dataset-fashion-mnist (Fashion-MNIST, MIT licence)"; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	$(PY) -m keras_transfer.weights download mobilenet_v2

lint: install
	$(VENV)/bin/ruff check keras_transfer tests benchmarks
	$(VENV)/bin/ruff format --check keras_transfer tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix keras_transfer tests benchmarks
	$(VENV)/bin/ruff format keras_transfer tests benchmarks

# The suite runs in TEST_WORKERS processes (pytest-xdist), one module per worker at a time so
# module fixtures are built once; tiny-model tests are mostly single-threaded Python.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test: install lint assets
	$(PYTEST)

test-fast: install assets
	$(PYTEST) -m "not slow"

# The first quickstart command: ImageNet MobileNetV2 (torchvision weights, imported offline)
# fine-tuned on 20 Fashion-MNIST images per class, tested on 2,000 held-out images, next to a
# small CNN trained from scratch on the same images. Under a minute on 2 CPU cores once installed.
demo: install assets
	$(VENV)/bin/keras-transfer weights fetch
	$(VENV)/bin/keras-transfer train fashion_mnist --per-class 20 --test-size 2000 \
	  --name fashion_mnist_demo --compare-scratch

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

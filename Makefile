# `make bench` runs the benchmark; `make test` runs the test suite. Both create the
# virtual environment on first use. A machine whose Python already has a CUDA torch
# keeps it (the venv sees system packages); otherwise torch==2.13.0 (CPU) is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyengine-installed

.PHONY: install bench test kernel clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "transformers>=4.56" tokenizers safetensors tqdm numpy "triton>=3.0" \
		pytest pytest-timeout pytest-benchmark pytest-xdist pybind11 cmake fastapi uvicorn "ray[data,serve]==2.60.0" "pyarrow>=14" jinja2 \
		peft pillow
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

bench: install
	$(PY) -m pyengine.bench

# One pytest worker per core (pytest-xdist; conftest.py splits torch's threads between them).
TEST_WORKERS ?= auto

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# Rebuild the CUDA extension in place, then one op's tests and microbenchmark: make kernel OP=rotary
kernel: install
	PYTHON=$(PY) scripts/dev_op.sh $(OP)

clean:
	rm -rf $(VENV) build *.egg-info pyengine/_C*.so

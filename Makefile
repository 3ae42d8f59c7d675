# One venv in .venv. On a machine without an NVIDIA GPU the set-up installs torch==2.13.0 (the
# CPU build); on a GPU machine the venv sees the system's own torch and keeps it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/activate:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q torch==2.13.0; \
	fi

$(BIN)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m hf_zero.demo --output_dir hf_zero_demo_output

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) hf_zero_demo_output .pytest_cache

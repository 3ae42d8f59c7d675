# One venv in .venv. On a machine without an NVIDIA GPU the set-up installs torch==2.13.0 (the
# CPU build); on a GPU machine the venv sees the system's own torch and keeps it.
#
# A second venv, .venv-oldest, holds the oldest transformers and accelerate that pyproject.toml
# allows (their ">=" floors, read from it below), so `make test` catches a floor that no longer
# works: it runs the Trainer-facing tests listed in tests/oldest_versions.txt there too (a few
# minutes on 2 cores). `make test-oldest` runs that part alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OLDEST_VENV := .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
# transformers==5.17 accelerate==1.15: the floors of pyproject.toml's dependencies.
OLDEST_PINS := $(shell sed -n 's/^ *"\(transformers\|accelerate\)>=\([0-9.]*\).*/\1==\2/p' pyproject.toml)

.PHONY: setup setup-oldest demo test test-oldest clean

# $(1): the venv folder. torch as the comment at the top says.
define make_venv
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m venv --system-site-packages $(1); \
	else \
		$(PY) -m venv $(1) && $(1)/bin/python -m pip install -q --upgrade pip && $(1)/bin/python -m pip install -q torch==2.13.0; \
	fi
endef

$(BIN)/activate:
	$(call make_venv,$(VENV))

$(BIN)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

$(OLDEST_BIN)/activate:
	$(call make_venv,$(OLDEST_VENV))

# The pins in the same install as the package: pip fails rather than upgrade them.
$(OLDEST_BIN)/.installed: $(OLDEST_BIN)/activate pyproject.toml
	@test -n "$(OLDEST_PINS)" || { echo "no transformers/accelerate floor found in pyproject.toml" >&2; exit 1; }
	$(OLDEST_BIN)/python -m pip install -q -e '.[test]' $(OLDEST_PINS)
	@touch $@

setup: $(BIN)/.installed

setup-oldest: $(OLDEST_BIN)/.installed

demo: setup
	$(BIN)/python -m hf_zero.demo --output_dir hf_zero_demo_output

# The whole suite, then the Trainer-facing tests against the oldest supported versions.
test: setup setup-oldest
	$(BIN)/python -m pytest -q --durations=30
	$(OLDEST_BIN)/python -m pytest -q -p no:cacheprovider @tests/oldest_versions.txt

test-oldest: setup-oldest
	$(OLDEST_BIN)/python -m pytest -q -p no:cacheprovider @tests/oldest_versions.txt

clean:
	rm -rf $(VENV) $(OLDEST_VENV) hf_zero_demo_output .pytest_cache

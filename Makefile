# Two entry points for a fresh machine (README quick start):
#   make demo   set up .venv and run the offline demo DAG to results/demo_miou.json
#   make test   set up .venv and run the test suite
# Both create .venv on first use; torch and torchvision are pinned in pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: demo test setup clean-results

setup: $(STAMP)

# Reinstall when the dependency list changes; the editable install tracks ssr/ itself.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) results/demo_miou.json

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-results:
	rm -rf results/demo results/demo_*.json

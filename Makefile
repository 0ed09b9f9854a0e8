# Entry points for a fresh machine (README quick start):
#   make demo        set up .venv, run the offline demo DAG (Snakemake) from scratch where needed, then `dvc commit`
#   make test        set up .venv, lint (ruff check .) and run the test suite
#   make test-portable  the suite again on other CPUs' kernel paths (AVX2 only, then none)
#   make schema      rewrite workflow/schemas/params.schema.json from ssr/config.py
#   make dvc         rewrite dvc.yaml (and workflow/dvc/*/dvc.yaml) from params.yaml and workflow/resources.yaml
#   make reference   the demo's reference run: a clean demo, then `dvc commit` -> dvc.lock; commit what it lists
# Each creates .venv on first use (with the test and export extras: the ONNX test runs onnxruntime);
# torch and torchvision are pinned in pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC's offline plots page (.dvc/config plots.html_template): vega's scripts from the installed vl-convert-python
PLOTS_TEMPLATE := .dvc/plots_template.html
CORES ?= 2
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: demo test test-portable lint schema setup dvc reference clean-results

setup: $(STAMP) $(PLOTS_TEMPLATE)

# Reinstall when the dependency list changes; the editable install tracks ssr/ itself.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,export]'
	touch $(STAMP)

# The target is the `demo` rule, which asks for every product of the demo's
# stages (models, pseudo-labels, predictions): a checkout without data/ and
# results/demo/ computes them all, whatever the committed metrics files say.
# Then dvc.lock records this machine's run (README, "make demo on another machine"): `dvc status`
# agrees with the checkout, and the first `dvc exp run` re-runs only the stages its params reach,
# even where float rounding makes the trained models differ from the reference run's. Skipped
# outside a git checkout and with per-site paths, which DVC does not follow (docs/workflow.md).
demo: $(STAMP) $(PLOTS_TEMPLATE)
	$(RUN) $(BIN)/snakemake --cores $(CORES) demo
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  echo "make demo: not a git checkout; dvc.lock left as it is"; \
	elif [ -n "$$SSR_DATA_ROOT$$SSR_RESULTS_ROOT$$SSR_WEIGHTS_ROOT" ] || [ -f params.local.yaml ]; then \
	  echo "make demo: per-site paths are set; dvc.lock left as it is (DVC follows params.yaml's paths)"; \
	else \
	  echo "$(BIN)/dvc commit --force --quiet"; $(RUN) $(BIN)/dvc commit --force --quiet; \
	fi

$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/python workflow/pipeline.py plots-template

test: lint
	$(RUN) $(BIN)/python -m pytest -q

# The suite on the CPU kernel paths of other machines, as torch's, oneDNN's and MKL's dispatchers
# allow: AVX2 only (an AMD EPYC before Zen 4, older Intel), then no vector extensions at all.
# Results may differ there by rounding; a test that fails is one that relied on this machine's.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(RUN) $(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(RUN) $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# params.yaml's JSON Schema, which the Snakefile validates against (tests/test_config.py checks it is current)
schema: $(STAMP)
	$(BIN)/ssr schema --out workflow/schemas/params.schema.json

dvc: $(STAMP)
	$(BIN)/python workflow/pipeline.py dvc

# The reference run that results/demo_*.json, dvc.lock and the method's curves
# record: the demo from scratch through Snakemake, then `dvc commit` writes
# dvc.lock from what is on disk (and caches data and models), and `dvc status`
# must agree that every stage is up to date.
reference: $(STAMP)
	@test -z "$$SSR_DATA_ROOT$$SSR_RESULTS_ROOT$$SSR_WEIGHTS_ROOT" -a ! -f params.local.yaml || \
	  { echo "make reference: DVC records params.yaml's paths; unset SSR_DATA_ROOT/SSR_RESULTS_ROOT/SSR_WEIGHTS_ROOT and move params.local.yaml away"; exit 1; }
	$(BIN)/ssr schema --out workflow/schemas/params.schema.json --check
	$(BIN)/python workflow/pipeline.py dvc --check
	rm -rf data/demo results/demo results/demo_*.json
	$(RUN) $(BIN)/snakemake --cores $(CORES) demo
	$(RUN) $(BIN)/dvc commit --force --quiet
	$(RUN) $(BIN)/dvc status --quiet
	@echo "reference run done; commit it with:"
	@echo "  git add dvc.lock results/demo_*.json results/demo/method/seed*/dvclive"

clean-results:
	rm -rf results/demo logs
	git checkout -- results/demo_*.json

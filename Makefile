# Two commands set everything up on a fresh machine (Python 3.11):
#   make demo   virtualenv + install + the main job on the bundled flights, local runner
#   make test   virtualenv + emulators (started by the test fixtures) + the whole suite
PYTHON ?= python3.11
VENV ?= .venv
BQ_VENV ?= .venv-bqemu
OUT ?= out/demo
PYTEST_ARGS ?= --durations=30
# The suite runs on PYTEST_WORKERS processes (pytest-xdist; 0: in this one), each with its own
# emulators; modules are handed out whole, longest first (tests/conftest.py), so a module's
# fixtures are built once and its tests keep their order.
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder

STAMP := $(VENV)/.installed
BQ_STAMP := $(BQ_VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv bqemulator mutation

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -c constraints.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# The BigQuery emulator lives in its own virtualenv: its dependencies would move Beam's.
bqemulator: $(BQ_STAMP)

$(BQ_STAMP): scripts/setup_bqemulator.sh
	PYTHON=$(PYTHON) bash scripts/setup_bqemulator.sh $(BQ_VENV)
	touch $@

# The whole local flow on the bundled flights: training data, a model, the same with the
# reference tables joined (weather at the origin, the aircraft, the destination airport), scores
# for the held-out period (Nov-Dec 2013, the eval split), a report comparing both and a chart.
# No cloud account needed.
demo: $(STAMP)
	@echo "== 1/6 prepare: 336,776 flights -> point-in-time features, tf.Transform, TFRecords"
	$(VENV)/bin/skewless prepare --output_dir $(OUT)/prepared
	@echo "== 2/6 train: wide-and-deep model exported with its tf.Transform graph"
	$(VENV)/bin/skewless train --prepared_dir $(OUT)/prepared --model_dir $(OUT)/models
	@echo "== 3/6 prepare flights_plus: the same + weather at the origin (as of departure - 1 h), aircraft, destination airport"
	$(VENV)/bin/skewless prepare --feature_set flights_plus --output_dir $(OUT)/prepared_plus
	@echo "== 4/6 train flights_plus"
	$(VENV)/bin/skewless train --prepared_dir $(OUT)/prepared_plus --model_dir $(OUT)/models_plus
	@echo "== 5/6 score: RunInference over the held-out period (Nov-Dec 2013), flights_plus model"
	$(VENV)/bin/skewless score --model_dir $(OUT)/models_plus --start 2013-11-01T00:00:00Z --output $(OUT)/scores
	@echo "== 6/6 report: flights_plus next to flights (no tables), the dep_delay rule and the majority class"
	$(VENV)/bin/skewless report --model_dir $(OUT)/models_plus --score_dir $(OUT)/scores \
		--prepared_dir $(OUT)/prepared_plus --compare_model_dir $(OUT)/models --chart $(OUT)/report.png
	@echo "Outputs under $(OUT)/ ; chart: $(OUT)/report.png"

test: $(STAMP) $(BQ_STAMP)
	BQ_EMULATOR_VENV=$(abspath $(BQ_VENV)) $(VENV)/bin/python -m pytest tests $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Mutation testing (not in CI: too slow) over skewless/transforms/ and skewless/models/versions.py with the fast
# tests (pyproject.toml [tool.mutmut]); report in out/mutation/report.md. One file at a time:
#   make mutation FILES="skewless/transforms/operations.py skewless/transforms/partials.py"
FILES ?=
MUTATION_JOBS ?= 1
DEV_STAMP := $(VENV)/.installed-dev

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $@

mutation: $(DEV_STAMP)
	$(VENV)/bin/python scripts/mutation.py --jobs $(MUTATION_JOBS) $(if $(FILES),--files $(FILES))

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python bench/prepare.py

clean:
	rm -rf $(VENV) $(BQ_VENV) out .pytest_cache mutants

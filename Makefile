# Set-up and everyday commands. Each target creates the virtual environment in .venv
# and installs the project (and its example plugins) on first use, with the releases
# pinned in constraints/dev.txt (torch, torchvision): the ones the tests run on.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mutualkd-installed
CONSTRAINTS := constraints/dev.txt
EXAMPLE_PLUGINS := $(wildcard plugins/mutualkd-*/pyproject.toml)

.PHONY: install quickstart test reference clean-runs

$(STAMP): pyproject.toml $(CONSTRAINTS) $(EXAMPLE_PLUGINS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,report,study,tensorboard,mlflow]" $(foreach p,$(EXAMPLE_PLUGINS),-e $(dir $(p)))
	@touch $(STAMP)

install: $(STAMP)

# Train two peers with Deep Mutual Learning on scikit-learn's digits (about a minute).
quickstart: $(STAMP)
	$(BIN)/mutualkd run recipes/quickstart.toml --set run.name=quickstart-$$(date +%Y%m%d-%H%M%S)

# The whole test suite.
# The image-folder tests and the data benchmark read real Fashion-MNIST images from Debian's
# dataset-fashion-mnist package: installed here when running as root (CI), skipped otherwise.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Test processes (pytest-xdist), each test file in one of them so that a file's shared set-up
# (module fixtures: a trained run, a launched job) is built once; every test runs one torch
# thread, so one worker per core. `make test TEST_WORKERS=1` runs them one after another.
TEST_WORKERS ?= 2

test: $(STAMP)
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: dataset-fashion-mnist not installed; the tests that need it are skipped"; fi
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Regenerate docs/recipes.md from the recipe and strategy models (the tests check it is current).
reference: $(STAMP)
	$(BIN)/python -m mutualkd.recipe_doc docs/recipes.md

clean-runs:
	rm -rf runs

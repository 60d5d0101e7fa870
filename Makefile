# make demo : create the environment if missing, write the synthetic shards, train the tiny demo Lance
#             (or reuse the cached checkpoint), run every task through infer.py, print the quality table
#             and write $(ROOT)/eval/{index.html,contact_sheet.png,scores.json}.
# make test : the test suite (what CI runs).
# Extra demo arguments: make demo ARGS="--retrain --config.train.steps=2000"
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ROOT ?= demo_out

.PHONY: demo test

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: $(PYTHON)
	$(PYTHON) -m lance_jax.demo.run --root $(ROOT) $(ARGS)

test: $(PYTHON)
	$(PYTHON) -m pytest -q

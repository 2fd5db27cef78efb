# Conveniences; the README's two commands work without make.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format bench

$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/installed
	$(VENV)/bin/effformer train --config experiments/digits/vit.py --workdir runs/digits_vit
	$(VENV)/bin/effformer eval --workdir runs/digits_vit

test: $(VENV)/installed
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/installed
	$(VENV)/bin/ruff check .

format: $(VENV)/installed
	$(VENV)/bin/ruff format effformer tests experiments

bench: $(VENV)/installed
	$(PY) experiments/benchmarks/attention.py
	$(PY) experiments/benchmarks/train_step.py

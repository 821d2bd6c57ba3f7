# Two commands on a fresh machine: `make train` and `make test`. Each first sets up .venv when it is missing or stale,
# so nobody has to remember an install line. Once set up, run with an accelerate config the usual way:
# .venv/bin/accelerate launch --config_file accelerate_configs/<file>.yaml train.py ...

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
# torch goes in alone first, at the version constraints.txt pins: resolved together with everything else, pip may
# pick another torch build (GBs of CUDA libraries).
TORCH := $(shell grep -m1 '^torch==' constraints.txt)

# A venv whose python or pip is missing (never made, creation interrupted, the system Python it points to gone) is
# made again from scratch, whatever its stamp says.
VENV_WORKS := $(shell test -x $(VENV)/bin/python && test -x $(VENV)/bin/pip && echo yes)

.PHONY: help install train test lint format FORCE

help:
	@echo 'make train [ARGS="recipe.yaml --flag value"]   install if needed, then accelerate launch train.py ARGS'
	@echo 'make test  [ARGS="-m unit -x"]                  install if needed, then pytest ARGS'
	@echo 'make lint                                       ruff check + ruff format --check (what CI runs)'
	@echo 'make format                                     ruff format + ruff check --fix (rewrites files)'
	@echo 'make install                                    (re)install .venv if pyproject.toml or constraints.txt'
	@echo '                                                changed or the last install failed; else nothing'
	@echo 'PYTHON=python3.12 picks the interpreter the venv is made from.'

train: install
	$(VENV)/bin/accelerate launch train.py $(ARGS)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

# ruff's settings (line length 120, the rules) are in pyproject.toml's [tool.ruff].
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

install: $(VENV)/.installed

# The stamp is removed first and written last, so it exists only after an install that succeeded; it is older than
# pyproject.toml or constraints.txt when either changed. Without it, or older, make redoes the install; else skips it.
$(VENV)/.installed: pyproject.toml constraints.txt $(if $(VENV_WORKS),,FORCE)
	rm -f $@
	$(if $(VENV_WORKS),,rm -rf $(VENV) && $(PYTHON) -m venv $(VENV))
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -c constraints.txt -e ".[test]"
	touch $@

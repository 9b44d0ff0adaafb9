# The two set-up commands (see README):  make demo   and   make test
# Each creates ./.venv on first use (or reuses it) and installs audioclf into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python recipes/fsdd.py --quick --preset cpu --out demo-out
	$(VENV)/bin/audioclf predict $$($(PY) -c 'import audioclf.datasets_dir as d; print(d.fsdd_example())') --bundle demo-out/bundle

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/audioclf bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache

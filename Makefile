# The two set-up commands (see README):  make demo   and   make test
# Each creates ./.venv on first use (or reuses it) and installs audioclf into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/fsdd.py --quick --out $(DEMO_OUT) --overwrite $(DEMO_ARGS)
	clip="$$($(PY) scripts/demo_clip.py $(DEMO_OUT))" && \
	$(VENV)/bin/audioclf predict "$$clip" --bundle $(DEMO_OUT)/bundle

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/audioclf bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache

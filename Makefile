# Developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo shapes-model

# .venv is created when missing, and the requirements are installed again when they change.
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements-dev.txt
	$(VENV)/bin/pip install -e . --no-deps
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) demo.py

shapes-model: venv
	$(PY) -m click4caption_apps.shapes_recipe

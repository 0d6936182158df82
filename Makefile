VENV ?= .venv
PY := $(VENV)/bin/python
# The shared data folder beside the checkout holds retinamnist.npz for tests and the demo.
export GECA_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE = 1
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/geca demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/attention.py
	$(PY) bench/train_step.py
	$(PY) bench/allocator.py
	$(PY) bench/sample.py

clean:
	rm -rf runs .pytest_cache

# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs export/*/ reports .pytest_cache

# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkit-installed

.PHONY: demo test install clean fashion-mnist targets kernels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,mobile,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) targets kernels
	$(BIN)/qkit demo

# The target CPUs of `qkit check --target`: qemu-user-static and an ARM64 python3.11 sysroot with ORT's aarch64
# wheel, cached in $(VENV)/qkit-targets. Needs root and apt; otherwise it says so and those targets are skipped.
targets: $(STAMP)
	$(BIN)/python -m qkit.targets.install

# qkit's own kernels (AdderNet's SAD), compiled from qkit/kernels/adder with the system C++ compiler into
# $(VENV)/qkit-kernels: x86-64 (every SIMD path, picked at run time) and, with the cross compiler `targets`
# installs, ARM64. A no-op when the sources are unchanged; without a compiler it says so and adder .pte files are skipped.
kernels: $(STAMP)
	$(BIN)/python -m qkit.kernels.build

# The full Fashion-MNIST comes from Debian's package; installed when we are root with apt, else its tests skip.
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

fashion-mnist:
	@test -f $(FASHION) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } ; } || \
	  echo "note: dataset-fashion-mnist not installed (needs root and apt); its tests will skip"

test: $(STAMP) fashion-mnist targets kernels
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs export/*/ reports .pytest_cache

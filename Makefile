# Each target sets itself up (a local .venv) and is safe to run again.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

$(BIN)/dmd: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Fashion-MNIST offline: Debian's package (needs root; tests that need it skip without it).
FASHION := /usr/share/datasets/fashion-mnist
$(FASHION):
	-apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "note: could not install dataset-fashion-mnist; its tests will be skipped"

.PHONY: demo test test-slow
demo: $(BIN)/dmd
	$(BIN)/dmd distill recipes/toy2d.toml
	$(BIN)/dmd sample runs/toy2d --num 10000 --out runs/toy2d/samples
	$(BIN)/dmd fid runs/toy2d/samples --ref gmm

test: $(BIN)/dmd | $(FASHION)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BIN)/dmd
	$(BIN)/python -m pytest -q -m slow

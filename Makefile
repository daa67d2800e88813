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

.PHONY: demo demo-steps demo-toy2d test test-slow
# The offline demo: DMD2 on the shipped Fashion-MNIST EDM teacher for a few minutes
# (recipes/fashion-demo.toml), then measured the benchmark's way beside the shipped student
# (fashion-mnist-dmd2, the benchmark's full run): one table (both students at 1 step, the teacher
# at 1, 4 and 18 Heun steps: FID, class accuracy, spread, images/s) and runs/demo/compare/grid.png.
# Rerunning resumes distill, and compare reads back the rows of unchanged students.
# The sizes are variables so that tests/test_demo.py runs the same steps tiny.
DMD ?= $(BIN)/dmd
DEMO ?= runs/demo
DEMO_NUM ?= 200
DEMO_SET ?=
DEMO_SHIPPED ?= fashion-mnist-dmd2
demo: $(BIN)/dmd
	@$(MAKE) --no-print-directory demo-steps

demo-steps:
	$(DMD) distill recipes/fashion-demo.toml --set run.out=$(DEMO)/student $(DEMO_SET)
	$(DMD) sample $(DEMO)/student --num $(DEMO_NUM) --teacher-steps 0 --batch-size 50 --out $(DEMO)/samples
	$(DMD) fid $(DEMO)/samples --ref fashion-mnist --features fashion --batch-size 50
	$(DMD) compare $(DEMO)/student $(DEMO_SHIPPED) --out $(DEMO)/compare --ref fashion-mnist --features fashion \
	    --num $(DEMO_NUM) --teacher-steps 1,4,18 --batch-size 50

# The exact 2-D teacher: the algorithm against a known score (about 12 minutes): the teacher's
# ODE pairs for the recipe's regression term, DMD2, then the mode metrics of 10,000 samples.
demo-toy2d: $(BIN)/dmd
	$(BIN)/dmd make-pairs --teacher gmm --recipe recipes/toy2d.toml --num 32768 --steps 50 \
	    --batch-size 4096 --shard-size 8192 --out pairs/toy2d
	$(BIN)/dmd distill recipes/toy2d.toml
	$(BIN)/dmd sample runs/toy2d --num 10000 --out runs/toy2d/samples
	$(BIN)/dmd fid runs/toy2d/samples --ref gmm

# One pytest worker a core (pytest-xdist; tests/conftest.py gives each worker its share of the
# threads and hands out the long tests first); the slowest ten are listed.
test: $(BIN)/dmd | $(FASHION)
	$(BIN)/python -m pytest -q -m "not slow" -n auto --durations=10

test-slow: $(BIN)/dmd
	$(BIN)/python -m pytest -q -m slow

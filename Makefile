# Every target creates .venv and installs the project first; nothing else is needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-slow gpu-check bench-data bench-step bench-speedup clean reproduce-table2 reproduce-table3 reproduce-table4 reproduce-table6 reproduce-deep-k

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(STAMP)

## demo: BP vs FDG (K=2), ResNet-20, CIFAR-10 subset, 4 epochs: a few minutes on a CPU
demo: $(STAMP)
	$(BIN)/fdgbench compare

## test: the default suite (slow tests excluded; `make test-slow` runs them). On the CPU whatever the machine
## (FDGBENCH_DEVICE, the default of --device): the suite's expectations (bitwise repeats, one rank per stage on
## one node) were written there; GPU paths are `make gpu-check`'s.
## TEST_WORKERS: pytest processes side by side (pytest-xdist); 2 fills a 2-core machine, more need memory
## (each worker imports torch, and the distributed tests spawn 2-4 ranks of their own)
TEST_WORKERS ?= 2

test: $(STAMP)
	FDGBENCH_DEVICE=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	FDGBENCH_DEVICE=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m slow

## gpu-check: the CUDA/NCCL paths on this machine's GPU(s), one table in a few minutes; one line without a GPU
gpu-check: $(STAMP)
	$(BIN)/fdgbench gpu-check

bench-data: $(STAMP)
	$(BIN)/fdgbench bench data

bench-step: $(STAMP)
	$(BIN)/fdgbench bench step --threads 1

bench-speedup: $(STAMP)
	$(BIN)/fdgbench bench speedup --model resnet56 --splits 2 --methods bp,fdg,ddg,fr,dgl,dp

## reproduce-table2 (and 3, 4): the table's sweep, its tables and its first row's curves; PRESET=full|quick|smoke
## (default full), converge (table2, table4), converge-gpu (table2, table4)
## The runs go to the committed records folder (RESULTS), so a sweep skips what earlier sittings or other
## machines recorded there and fills in the rest (weights and checkpoints stay out of git: .gitignore).
## DEVICE: where the runs train (auto: the preset's device where it names one, else CUDA where available,
## else the CPU); the table reads the runs of the same device. JOBS=N: N runs side by side (e.g. on one GPU),
## each its own `fdgbench run` process (the subprocess launcher); unset, one run after another in one process.
PRESET ?= full
RESULTS ?= paper_tables/results/runs
DEVICE ?= auto
JOBS ?=
LAUNCH = $(if $(JOBS),--launcher subprocess --jobs $(JOBS))
# Also the default device of every command below, so `plot curves` (no --device) reads the runs the sweep trained.
reproduce-table2 reproduce-table3 reproduce-table4 reproduce-table6: export FDGBENCH_DEVICE = $(DEVICE)
reproduce-table2 reproduce-table3 reproduce-table4: $(STAMP)
	$(BIN)/fdgbench sweep $(@:reproduce-%=%) --preset $(PRESET) --out $(RESULTS) --device $(DEVICE) $(LAUNCH)
	$(BIN)/fdgbench table $(@:reproduce-%=%) --preset $(PRESET) --out $(RESULTS) --device $(DEVICE)
	$(BIN)/fdgbench plot curves $(@:reproduce-%=%) --preset $(PRESET) --out $(RESULTS)

## reproduce-deep-k: local learning against delayed gradients as K grows (paper_tables/deep_k.toml): its sweep,
## tables and the error-against-K plot; PRESET=full|converge|quick|smoke, DEVICE and JOBS as above.
reproduce-deep-k: export FDGBENCH_DEVICE = $(DEVICE)
reproduce-deep-k: $(STAMP)
	$(BIN)/fdgbench sweep deep_k --preset $(PRESET) --out $(RESULTS) --device $(DEVICE) $(LAUNCH)
	$(BIN)/fdgbench table deep_k --preset $(PRESET) --out $(RESULTS) --device $(DEVICE)
	$(BIN)/fdgbench plot k deep_k --preset $(PRESET) --out $(RESULTS)

## reproduce-table6: the time table (seconds per epoch, one worker per stage). DEVICE as above; JOBS is not
## used: runs side by side would share the hardware whose speed this table measures.
reproduce-table6: $(STAMP)
	$(BIN)/fdgbench sweep table6 --preset $(PRESET) --out $(RESULTS) --device $(DEVICE)
	$(BIN)/fdgbench table table6 --preset $(PRESET) --out $(RESULTS) --device $(DEVICE)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# vitexplain — developer and demo targets. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= deit_tiny_patch16_224
# Real weights beside the checkout are used when present (machines without hub access);
# otherwise timm downloads the pretrained weights. Override with CHECKPOINT=path or CHECKPOINT=.
CHECKPOINT ?= $(wildcard ../shared/weights/$(MODEL).pth)
CHECKPOINT_ARG := $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
OUT ?= vitexplain-out
# Extra pip arguments, e.g. a torch build: PIP_EXTRA="torch==2.14.1 torchvision==0.29.1"
PIP_EXTRA ?=

.PHONY: install demo test bench clean

$(BIN)/vitexplain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e '.[test]'
	touch $@

install: $(BIN)/vitexplain

demo: install
	$(BIN)/vitexplain rollout examples/images --model $(MODEL) $(CHECKPOINT_ARG) --out $(OUT) --fusion max --discard-ratio 0.9
	$(BIN)/vitexplain grad-rollout examples/images --model $(MODEL) $(CHECKPOINT_ARG) --out $(OUT)
	@echo "overlays and manifest.jsonl in $(OUT)/"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/flow.py

clean:
	rm -rf $(OUT) .pytest_cache

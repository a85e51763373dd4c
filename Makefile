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
# Extra pip arguments, e.g. a torch build: PIP_EXTRA="torch==2.14.1 torchvision==0.29.1", or the CPU-only
# build on a machine without a GPU: PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu torch"
PIP_EXTRA ?=

.PHONY: install demo test bench examples gallery clean

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

# The README's pictures. `make examples` regenerates them all from examples/images.
GALLERY ?= docs/gallery
GALLERY_RUN = $(BIN)/vitexplain
GALLERY_ARGS = --model $(MODEL) $(CHECKPOINT_ARG) --out $(GALLERY) --max-side 224

# The README's evaluation tables and curves: `evaluate` over the bundled photos with both reference models
# (DeiT-tiny and ViT-tiny; the tables are spliced in).
EVALUATION_OUT ?= $(OUT)/examples-evaluation
EVALUATION_METRICS ?= deletion,insertion,positive,negative,grid
EVALUATION_METHODS ?= rollout,grad-rollout,flow,grad-attention,chefer,legrad,lrp,lrp[rule=cp-conservative],lrp[rule=attnlrp]
SECOND_MODEL ?= vit_tiny_patch16_224
SECOND_CHECKPOINT ?= $(wildcard ../shared/weights/$(SECOND_MODEL).pth)
SECOND_CHECKPOINT_ARG := $(if $(SECOND_CHECKPOINT),--checkpoint $(SECOND_CHECKPOINT))

examples: install
	$(MAKE) gallery
	$(BIN)/python docs/splice_table.py README.md $(EVALUATION_OUT)/summary.md $(EVALUATION_OUT)-$(SECOND_MODEL)/summary.md

gallery:
	rm -rf $(GALLERY)
	$(GALLERY_RUN) rollout examples/images $(GALLERY_ARGS) --fusion mean --discard-ratio 0
	$(GALLERY_RUN) rollout examples/images $(GALLERY_ARGS) --fusion max --discard-ratio 0.9
	$(GALLERY_RUN) flow examples/images $(GALLERY_ARGS)
	$(GALLERY_RUN) grad-rollout examples/images/rocket.jpg $(GALLERY_ARGS) --class 517 --class 657
	$(GALLERY_RUN) grad-rollout examples/images/coffee.jpg $(GALLERY_ARGS) --class espresso --class "wooden spoon"
	$(GALLERY_RUN) grad-attention examples/images/rocket.jpg $(GALLERY_ARGS) --class 517 --class 657
	$(GALLERY_RUN) grad-attention examples/images/coffee.jpg $(GALLERY_ARGS) --class espresso --class "wooden spoon"
	$(GALLERY_RUN) chefer examples/images/rocket.jpg $(GALLERY_ARGS) --class 517 --class 657
	$(GALLERY_RUN) chefer examples/images/coffee.jpg $(GALLERY_ARGS) --class espresso --class "wooden spoon"
	$(GALLERY_RUN) legrad examples/images/rocket.jpg $(GALLERY_ARGS) --class 517 --class 657
	$(GALLERY_RUN) legrad examples/images/coffee.jpg $(GALLERY_ARGS) --class espresso --class "wooden spoon"
	$(GALLERY_RUN) lrp examples/images/rocket.jpg $(GALLERY_ARGS) --class 517 --class 657
	$(GALLERY_RUN) lrp examples/images/coffee.jpg $(GALLERY_ARGS) --class espresso --class "wooden spoon"
	$(GALLERY_RUN) sweep examples/images/chelsea.png examples/images/rocket.jpg $(GALLERY_ARGS) --fusion max --ratios 0:0.95:12
	rm -f $(GALLERY)/manifest.jsonl $(GALLERY)/.vitexplain.lock
	rm -rf $(EVALUATION_OUT) $(EVALUATION_OUT)-$(SECOND_MODEL)
	$(GALLERY_RUN) evaluate examples/images --model $(MODEL) $(CHECKPOINT_ARG) --out $(EVALUATION_OUT) --methods '$(EVALUATION_METHODS)' --metrics $(EVALUATION_METRICS)
	$(GALLERY_RUN) evaluate examples/images --model $(SECOND_MODEL) $(SECOND_CHECKPOINT_ARG) --out $(EVALUATION_OUT)-$(SECOND_MODEL) --methods '$(EVALUATION_METHODS)' --metrics $(EVALUATION_METRICS)
	cp $(EVALUATION_OUT)/curves.png $(GALLERY)/evaluation-curves.png

bench: install
	$(BIN)/python benchmarks/cli_help.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/ray_engine.py
	$(BIN)/python benchmarks/pointing_game.py
	$(BIN)/python benchmarks/flow.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(OUT) .pytest_cache

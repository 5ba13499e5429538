# adaptive-transfer: one-command setup, tests and demo.
#
#   make test            set up .venv (first time) and run the tests
#   make demo            set up .venv and run the whole pipeline on generated data
#   make install         only set up .venv (idempotent; a stamp file skips it when
#                        setup.py and this Makefile are unchanged)
#
# Variables:
#   PYTHON=python3       interpreter that creates the venv (>= 3.10)
#   VENV=.venv           where the environment lives
#   TORCH=torch==2.13.0  torch requirement installed first. The default is the
#                        CPU build these machines hold on disk. On a GPU machine
#                        choose your own, e.g. TORCH="torch==2.5.1"; TORCH= keeps
#                        whatever torch the venv already has.
#   PYTEST_ARGS=         extra arguments for pytest (e.g. -k resample -x)
#
#   make resample TARGET=food101 SIZE=80M [SOURCE=jft MATCHER=same|elastic
#        DRAW=multinomial|systematic SEED=0 RUNNER=DirectRunner SPARK_MASTER=local[*]
#        OUT=out TARGET_ROOT=... MODEL=generalist.pt SAMPLES_PER_SHARD=10000
#        ALLOW_URI_PREFIX="gs://images/ /data/imagenet/train" DEDUP=1]
#        weights (Beam) -> near-duplicates of the target's train and test images
#        (Beam; DEDUP=0 skips it) -> resample without them (Spark) -> shards (Spark)
#        -> verify, reusing finished stages and stored source embeddings.
#        TARGET=demo runs the same path on generated data.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
TARGET ?= demo
SIZE ?=
SOURCE ?=
MATCHER ?= same
DRAW ?= multinomial
SEED ?= 0
RUNNER ?= DirectRunner
SPARK_MASTER ?=
OUT ?= out
TARGET_ROOT ?=
MODEL ?=
SAMPLES_PER_SHARD ?= 10000
ALLOW_URI_PREFIX ?=
DEDUP ?= 1

.PHONY: install test demo resample clean distclean

install: $(STAMP)

$(STAMP): setup.py Makefile
	@command -v java >/dev/null 2>&1 || echo "warning: no 'java' on PATH; Spark needs Java 17 (apt-get install openjdk-17-jre-headless)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet setuptools wheel packaging $(if $(strip $(TORCH)),"$(TORCH)")
	@# DeepSpeed builds against the torch installed above: no build isolation,
	@# or pip would fetch a second (CUDA) torch into a build environment.
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	$(BIN)/python -c "import schemas, beam_pipelines, spark_jobs, trainer"
	@touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m adaptive_transfer.demo --out $(DEMO_OUT)

resample: install
	@test -n "$(SIZE)" || { echo "make resample: set SIZE (e.g. SIZE=80M; SIZE=5000 for TARGET=demo)"; exit 2; }
	$(BIN)/python -m adaptive_transfer.resample --target "$(TARGET)" --size "$(SIZE)" \
	  $(if $(SOURCE),--source "$(SOURCE)") --matcher "$(MATCHER)" --draw "$(DRAW)" --seed "$(SEED)" \
	  --runner "$(RUNNER)" $(if $(SPARK_MASTER),--spark-master "$(SPARK_MASTER)") --out "$(OUT)" \
	  $(if $(TARGET_ROOT),--target-root "$(TARGET_ROOT)") $(if $(MODEL),--model "$(MODEL)") \
	  --samples-per-shard "$(SAMPLES_PER_SHARD)" $(foreach p,$(ALLOW_URI_PREFIX),--allow-uri-prefix "$(p)") \
	  $(if $(filter 0,$(DEDUP)),--no-dedup)

clean:
	rm -rf $(DEMO_OUT) $(OUT) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

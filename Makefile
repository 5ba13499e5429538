# adaptive-transfer: one-command setup, tests and demo.
#
#   make test            set up .venv (first time) and run the tests
#   make test-cluster    the tests where nothing is shared but object storage (tests/test_cluster*.py:
#                        a Spark standalone cluster of isolated workers with the packed env, two
#                        DeepSpeed nodes with their own disks, Beam SDK workers in their own env;
#                        root and unshare for the Spark workers); .ci/run runs both
#   make demo            set up .venv and run the whole pipeline on generated data (one seed, ~3 min)
#   make experiment      the paper's findings on generated data: 3 targets, 10 arms, Figure 3's sizes,
#                        5 seeds, intervals (~1 h on 2 cores; EXPERIMENT_OUT=experiment_out,
#                        QUICK=1 for one tiny seed, SEEDS=0,1,2 to choose; finished stages are reused);
#                        DATA=real: the same on the real images of `make real-data` (DRAWS=0,1)
#   make install         only set up .venv (idempotent; a stamp file skips it when
#                        setup.py, the lock and this Makefile are unchanged)
#   make lock            resolve setup.py's requirements once, in a fresh venv, into the lock
#                        (LOCK, every package at one version, torch excepted; scripts/lock.py):
#                        run it after changing a requirement in setup.py, and commit the lock
#
# Variables:
#   PYTHON=python3       interpreter that creates the venv (>= 3.10)
#   VENV=.venv           where the environment lives
#   TORCH=torch==2.13.0  torch requirement installed first. The default is the
#                        CPU build these machines hold on disk. On a GPU machine
#                        choose your own, e.g. TORCH="torch==2.5.1"; TORCH= keeps
#                        whatever torch the venv already has.
#   LOCK=requirements/constraints.txt
#                        the versions `make install` installs (pip -c): pip resolves nothing,
#                        so it never backtracks. LOCK= resolves setup.py's ranges afresh (e.g.
#                        with a TORCH= whose own pins differ from the lock's).
#   PYTEST_ARGS=         extra arguments for pytest (e.g. -k resample -x)
#   TEST_WORKERS=2       make test's pytest-xdist workers (most tests wait on a JVM or a
#                        subprocess; 0 runs them in this process, one at a time)
#
#   make resample TARGET=food101 SIZE=80M [SOURCE=jft MATCHER=same|elastic
#        DRAW=multinomial|systematic SEED=0 RUNNER=DirectRunner SPARK_MASTER=local[*]
#        OUT=out TARGET_ROOT=... MODEL=generalist.pt SAMPLES_PER_SHARD=10000
#        ALLOW_URI_PREFIX="gs://images/ /data/imagenet/train" DEDUP=1 MAX_SIDE=512 QUALITY=90]
#        weights (Beam) -> near-duplicates of the target's train and test images
#        (Beam; DEDUP=0 skips it) -> resample without them (Spark) -> shards (Spark)
#        -> verify, reusing finished stages and stored source embeddings.
#        TARGET=demo runs the same path on generated data.
#
#   make spark-env [SPARK_ENV_DIR=build/spark-env SPARK_ENV_EXTRAS=spark,gcs,s3]
#        what spark-submit ships to executors (docs/scale.md, "Spark cluster"):
#        SPARK_ENV_DIR/env.tar.gz, a virtualenv holding only setup.py's SPARK_ENV_EXTRAS
#        (no torch, no pyspark: executors take pyspark from their Spark) at the versions
#        of this venv, packed with venv-pack (--archives env.tar.gz#env,
#        spark.pyspark.python=./env/bin/python; executors need the same python3 at the
#        same path, or SPARK_ENV_PYTHON_PREFIX=/usr for where theirs lives; a tar.gz:
#        Spark unpacks it with tar, keeping the interpreter's symlink), rebuilt when
#        setup.py changes; and
#        SPARK_ENV_DIR/code.zip, this project's schemas/ and spark_jobs/ (--py-files;
#        not the data generator), rebuilt when they change.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= requirements/constraints.txt
LOCK_DIR := build/lock
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
EXPERIMENT_OUT ?= experiment_out
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
MAX_SIDE ?=
QUALITY ?=
ALLOW_URI_PREFIX ?=
DEDUP ?= 1
SPARK_ENV_DIR ?= build/spark-env
SPARK_ENV_EXTRAS ?= spark,gcs,s3
SPARK_ENV_PYTHON_PREFIX ?=

.PHONY: install lock test test-cluster demo experiment resample real-data gpu-bundle spark-env clean distclean

install: $(STAMP)

$(STAMP): setup.py Makefile $(LOCK)
	@command -v java >/dev/null 2>&1 || echo "warning: no 'java' on PATH; Spark needs Java 17 (apt-get install openjdk-17-jre-headless)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(LOCK),-c $(LOCK)) setuptools wheel packaging \
	  $(if $(strip $(TORCH)),"$(TORCH)")
	@# DeepSpeed builds against the torch installed above: no build isolation,
	@# or pip would fetch a second (CUDA) torch into a build environment.
	$(BIN)/python -m pip install --quiet $(if $(LOCK),-c $(LOCK)) --no-build-isolation -e ".[test]"
	$(BIN)/python -c "import schemas, beam_pipelines, spark_jobs, trainer"
	$(BIN)/python -m trainer.ops build  # DeepSpeed's CPU op, built once here rather than by a training run
	@touch $@

# One resolution in a fresh venv: what torch's install brings (pip freeze) and what
# `pip install -e .[test]` would add to it (pip's --report), torch itself left out.
lock:
	rm -rf $(LOCK_DIR) && mkdir -p $(LOCK_DIR) $(dir $(LOCK))
	$(PYTHON) -m venv $(LOCK_DIR)/venv
	$(LOCK_DIR)/venv/bin/python -m pip install --quiet setuptools wheel packaging \
	  $(if $(strip $(TORCH)),"$(TORCH)")
	$(LOCK_DIR)/venv/bin/python -m pip install --quiet --no-build-isolation --dry-run \
	  --report $(LOCK_DIR)/report.json -e ".[test]"
	$(LOCK_DIR)/venv/bin/python -m pip freeze --all --exclude-editable > $(LOCK_DIR)/freeze.txt
	$(LOCK_DIR)/venv/bin/python scripts/lock.py $(LOCK_DIR)/report.json $(LOCK_DIR)/freeze.txt $(LOCK)
	rm -rf $(LOCK_DIR)

TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

test-cluster: install
	ADAPTIVE_TRANSFER_CLUSTER_TESTS=1 $(BIN)/python -m pytest $(wildcard tests/test_cluster*.py) $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m adaptive_transfer.demo --output $(DEMO_OUT)

DATA ?= generated
# DATA=real: the real images of `make real-data` (REAL_DATA); DRAWS: their data draws (default 0,1).
experiment: install
	@if [ "$(DATA)" = real ] && [ ! -d "$(REAL_DATA)/fashion-mnist" ]; then \
	  echo "make experiment DATA=real: no real images under $(REAL_DATA); run \`make real-data\` first"; exit 2; fi
	$(BIN)/python -m adaptive_transfer.experiment --output $(EXPERIMENT_OUT) $(if $(QUICK),--quick) \
	  $(if $(SEEDS),--seeds $(SEEDS)) --data $(DATA) $(if $(filter real,$(DATA)),--real-data $(REAL_DATA)) \
	  $(if $(DRAWS),--draws $(DRAWS))

resample: install
	@test -n "$(SIZE)" || { echo "make resample: set SIZE (e.g. SIZE=80M; SIZE=5000 for TARGET=demo)"; exit 2; }
	$(BIN)/python -m adaptive_transfer.resample --target "$(TARGET)" --size "$(SIZE)" \
	  $(if $(SOURCE),--source "$(SOURCE)") --matcher "$(MATCHER)" --draw "$(DRAW)" --seed "$(SEED)" \
	  --runner "$(RUNNER)" $(if $(SPARK_MASTER),--master "$(SPARK_MASTER)") --output "$(OUT)" \
	  $(if $(TARGET_ROOT),--target-root "$(TARGET_ROOT)") $(if $(MODEL),--checkpoint "$(MODEL)") \
	  --samples-per-shard "$(SAMPLES_PER_SHARD)" $(foreach p,$(ALLOW_URI_PREFIX),--allow-uri-prefix "$(p)") \
	  $(if $(filter 0,$(DEDUP)),--no-dedup) $(if $(MAX_SIDE),--max-side "$(MAX_SIDE)") \
	  $(if $(QUALITY),--quality "$(QUALITY)")

REAL_DATA ?= data/real
REAL_SEEDS ?= 0 1
# The real-image datasets (Fashion-MNIST, Animal-MNIST, MNIST digits; pinned archives checked by
# sha256) and, per seed in REAL_SEEDS, a source and three targets built from them under REAL_DATA.
real-data: install
	$(BIN)/python -m adaptive_transfer.real_data.fetch --cache $(REAL_DATA)
	@for seed in $(REAL_SEEDS); do \
	  $(BIN)/python -m adaptive_transfer.real_data.build --cache $(REAL_DATA) --seed $$seed || exit 1; \
	done

BUNDLE ?= dist/gpu-bundle
# Wheels for an air-gapped GPU node that has torch but no package index: DeepSpeed built as a
# wheel with the trainer's pure-Python dependencies and this project (scripts/gpu_bundle.sh).
gpu-bundle: install
	PY=$(BIN)/python bash scripts/gpu_bundle.sh $(BUNDLE)

spark-env: install $(SPARK_ENV_DIR)/env.tar.gz $(SPARK_ENV_DIR)/code.zip

# The extras' requirements are installed with the project, which is then removed:
# the executors get the code from code.zip, so a code change needs no new env. The
# driver's versions are the constraints (Arrow, numpy and pandas alike on both sides).
$(SPARK_ENV_DIR)/env.tar.gz: setup.py
	rm -rf $(SPARK_ENV_DIR)/venv && mkdir -p $(SPARK_ENV_DIR)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v " @ " > $(SPARK_ENV_DIR)/constraints.txt
	$(PYTHON) -m venv $(SPARK_ENV_DIR)/venv
	$(SPARK_ENV_DIR)/venv/bin/python -m pip install --quiet -c $(SPARK_ENV_DIR)/constraints.txt \
	  ".[$(SPARK_ENV_EXTRAS)]"
	$(SPARK_ENV_DIR)/venv/bin/python -m pip uninstall --quiet --yes adaptive-transfer pip setuptools
	$(BIN)/python -m venv_pack --quiet --force --prefix $(SPARK_ENV_DIR)/venv --exclude "*/tests/*" \
	  --output $(SPARK_ENV_DIR)/tmp.tar.gz \
	  $(if $(SPARK_ENV_PYTHON_PREFIX),--python-prefix $(SPARK_ENV_PYTHON_PREFIX))
	mv $(SPARK_ENV_DIR)/tmp.tar.gz $@ && rm -rf $(SPARK_ENV_DIR)/venv

# Not shipped: the deprecated `python -m schemas.synthetic` (the data generator
# itself is adaptive_transfer/synthetic.py, which executors never import).
CODE_ZIP_EXCLUDE := schemas/synthetic.py
$(SPARK_ENV_DIR)/code.zip: $(filter-out $(CODE_ZIP_EXCLUDE),$(wildcard schemas/*.py spark_jobs/*.py spark_jobs/*/*.py))
	@mkdir -p $(SPARK_ENV_DIR)
	$(BIN)/python -c "import pathlib, sys, zipfile; \
	  skip = set(sys.argv[2].split()); \
	  z = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED); \
	  [z.write(f) for d in sys.argv[3:] for f in sorted(pathlib.Path(d).rglob('*.py')) if f.as_posix() not in skip]; \
	  z.close()" $@.tmp "$(CODE_ZIP_EXCLUDE)" schemas spark_jobs && mv $@.tmp $@

clean:
	rm -rf $(DEMO_OUT) $(EXPERIMENT_OUT) $(OUT) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

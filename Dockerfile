# Custom SDK container for the Beam workers of beam_pipelines.importance_weights
# (Dataflow: --sdk_container_image IMAGE --sdk_location container). It holds
# setup.py's `beam` extra (Beam, torch, what write_outputs plots), the object
# stores (`gcs`, `s3`, Beam's GCP I/O: `dataflow`), torchvision (ResNet-50,
# Inception-v3) and this project's code, on Beam's own Python SDK image, whose
# /opt/apache/beam/boot is the entrypoint Dataflow starts. Nothing is installed
# when a worker starts. Build the variant the workers need:
#
#   docker build --build-arg VARIANT=cpu  -t "$IMAGE:cpu"  .
#   docker build --build-arg VARIANT=cuda -t "$IMAGE:cuda" .   # GPU workers, --inference_device GPU
#
# BEAM_VERSION and PYTHON_VERSION must be the launching machine's apache-beam
# and Python (Dataflow refuses a mismatch); TORCH_VERSION is the torch the
# generalist was trained and tested with.
ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

ARG BEAM_VERSION
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The CUDA wheels carry the CUDA runtime and cuDNN as pip packages; the driver is
# the worker VM's (--dataflow_service_options "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver").
ARG CUDA_INDEX=https://download.pytorch.org/whl/cu126

# torch (and a torchvision built for it) first, from the variant's index: the CPU
# wheels keep the image small, the CUDA ones run on GPU workers.
RUN case "$VARIANT" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index="$CUDA_INDEX" ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; \
    esac \
 && pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}" torchvision

WORKDIR /opt/adaptive-transfer
COPY setup.py ./
COPY schemas/ schemas/
COPY beam_pipelines/ beam_pipelines/
COPY trainer/ trainer/
COPY spark_jobs/ spark_jobs/
COPY adaptive_transfer/ adaptive_transfer/
# The worker extra at the image's Beam (pip keeps the torch above: it satisfies
# the extra), then a check that the pipeline's modules import.
RUN pip install --no-cache-dir ".[beam,gcs,s3,dataflow]" "apache-beam[gcp]==${BEAM_VERSION}" \
 && python -c "import beam_pipelines.importance_weights, torch, torchvision; print('torch', torch.__version__)"

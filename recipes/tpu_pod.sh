#!/usr/bin/env bash
# Launch `jaxstack train` on every worker of a Cloud TPU VM pod slice.
# Each worker runs one process; jaxstack.distributed.initialize() finds the coordinator
# and process ids through JAX's Cloud TPU detection, and each host loads only its share of
# every batch.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORK_DIR=gs://bucket/runs/8b \
#     recipes/tpu_pod.sh --model.num_layers 32 --train.num_steps 10000
#
# WORK_DIR is one place every worker writes (checkpoints are written by all hosts): a
# gs:// bucket path or a shared filesystem. Elsewhere run the same `jaxstack train` directly:
#   CPU or one GPU / TPU VM:  jaxstack train --model.num_layers 32 --train.num_steps 10000
#   a GPU cluster:            recipes/slurm_gpu.sbatch
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORK_DIR:?set WORK_DIR to a bucket path every worker can write}"
PACKAGE=${PACKAGE:-jaxstack[tpu]}

args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  python3 -m pip install -q '$PACKAGE'
  jaxstack train --train.work_dir '$WORK_DIR' --model.dtype bfloat16 \
    --model.scan_layers true --mesh 'data=-1,fsdp=4' $args
"

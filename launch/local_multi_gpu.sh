#!/bin/bash
# One node, all of its GPUs, one process:
#
#   launch/local_multi_gpu.sh configs/sop_vit.py runs/sop_vit_8 --config.batch_size=4000 \
#       --config.chunk_size=125
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/local_multi_gpu.sh configs/cub_vit.py runs/cub_4
#
# A single process drives every visible GPU (JAX's global-array view needs no per-GPU
# processes), so jax.distributed is not started. config.batch_size is the GLOBAL batch and
# config.chunk_size is per GPU: batch_size must be a multiple of chunk_size x number of GPUs.
set -euo pipefail
CONFIG=${1:?usage: launch/local_multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: launch/local_multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2

export XLA_PYTHON_CLIENT_PREALLOCATE=true
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_all_reduce_combine_threshold_bytes=1073741824"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Not part of a multi-process job even if started inside a SLURM allocation or mpirun.
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
export SLURM_NTASKS=1 OMPI_COMM_WORLD_SIZE=1

python -c "import jax; print(f'{jax.device_count()} devices: {jax.devices()}')"
exec python -m recall_jax.main --config "${CONFIG}" --workdir "${WORKDIR}" "$@"

#!/bin/bash
# Two nodes without a scheduler: run this on each node with NODE_RANK=0 and NODE_RANK=1.
#   node0$ NODE_RANK=0 MASTER_ADDR=node0 bash scripts/multi_node_sft.sh
#   node1$ NODE_RANK=1 MASTER_ADDR=node0 bash scripts/multi_node_sft.sh
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}" "${MASTER_ADDR:?set MASTER_ADDR (the master node)}"
export NNODES=${NNODES:-2} NPROC_PER_NODE=${NPROC_PER_NODE:-8} MASTER_PORT=${MASTER_PORT:-29500}
megatron sft \
    --model "${MODEL:-Qwen/Qwen3-8B}" --dataset "${DATASET:-my_chat.jsonl}" \
    --tensor_model_parallel_size 4 --pipeline_model_parallel_size 2 --sequence_parallel true \
    --padding_free true --micro_batch_size 1 --global_batch_size 64 --max_epochs 1 --lr 1e-5 \
    --save "${SAVE:-megatron_output/sft}"

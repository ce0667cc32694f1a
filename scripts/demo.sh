#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU (2 processes, gloo):
#   tiny HF model + chat data (made here) -> megatron sft (TP=2, padding-free) -> megatron export
#   --to_hf -> transformers generates with the fine-tuned model.
# Sets up ./.venv first if needed. Output in $DEMO_OUT (default output/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${DEMO_OUT:-output/demo}
ITERS=${DEMO_ITERS:-200}  # 150 left some sums wrong ("7 plus 2 is 8")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
rm -rf "$OUT"

echo "== 1/4 make a tiny Qwen3-architecture HF model and a chat dataset in $OUT"
.venv/bin/python -m megatron_swift.demo prepare --out "$OUT"

echo "== 2/4 megatron sft: TP=2 on 2 CPU processes, padding-free batches"
NPROC_PER_NODE=2 .venv/bin/megatron sft \
  --model "$OUT/tiny-qwen3" --dataset "$OUT/chat.jsonl" --split_dataset_ratio 0 \
  --tensor_model_parallel_size 2 --sequence_parallel true --padding_free true \
  --micro_batch_size 4 --global_batch_size 16 --train_iters "$ITERS" \
  --lr 2e-3 --min_lr 2e-4 --lr_warmup_iters 5 --log_interval 10 \
  --save "$OUT/sft" --add_version false --save_interval 1000

echo "== 3/4 megatron export: mcore checkpoint -> Hugging Face safetensors"
.venv/bin/megatron export --mcore_model "$OUT/sft" --to_hf true --output_dir "$OUT/sft-hf"

echo "== 4/4 transformers generates with the exported model"
.venv/bin/python -m megatron_swift.demo generate --model "$OUT/sft-hf"
echo "loss curve: $OUT/sft/logging.jsonl (tensorboard --logdir $OUT/sft/runs)"

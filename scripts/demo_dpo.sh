#!/usr/bin/env bash
# DPO on the embedded tiny model, end to end on CPU (2 processes, gloo), a few minutes:
#   tiny HF model + preference pairs (right vs wrong sums, made here) -> how often transformers
#   prefers the chosen answer -> megatron rlhf --rlhf_type dpo (TP=2 + SP, padding-free) ->
#   megatron export --to_hf -> the same measure on the trained model (it should rise towards 1).
# Sets up ./.venv first if needed. Output in $DEMO_OUT (default output/demo_dpo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${DEMO_OUT:-output/demo_dpo}
ITERS=${DEMO_ITERS:-60}  # DPO alone (--rpo_alpha none): the NLL term would lift both answers alike
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
rm -rf "$OUT"

echo "== 1/5 make a tiny Qwen3-architecture HF model and 100 preference pairs in $OUT"
.venv/bin/python -m megatron_swift.rlhf.demo prepare --out "$OUT"

echo "== 2/5 before: how often the model gives the chosen answer the higher log-prob"
.venv/bin/python -m megatron_swift.rlhf.demo preference --model "$OUT/tiny-qwen3" --data "$OUT/pairs.jsonl"

echo "== 3/5 megatron rlhf --rlhf_type dpo: TP=2 + SP on 2 CPU processes, padding-free"
NPROC_PER_NODE=2 .venv/bin/megatron rlhf --rlhf_type dpo \
  --model "$OUT/tiny-qwen3" --dataset "$OUT/pairs.jsonl" --split_dataset_ratio 0 \
  --tensor_model_parallel_size 2 --sequence_parallel true --padding_free true \
  --micro_batch_size 4 --global_batch_size 16 --train_iters "$ITERS" --beta 0.5 --rpo_alpha none \
  --lr 2e-3 --min_lr 2e-4 --lr_warmup_iters 3 --log_interval 10 \
  --save "$OUT/dpo" --add_version false --save_interval 1000

echo "== 4/5 megatron export: mcore checkpoint -> Hugging Face safetensors"
.venv/bin/megatron export --mcore_model "$OUT/dpo" --to_hf true --output_dir "$OUT/dpo-hf"

echo "== 5/5 after: the same measure on the DPO-trained model, and how often its margin grew (reward accuracy)"
.venv/bin/python -m megatron_swift.rlhf.demo preference --model "$OUT/dpo-hf" --data "$OUT/pairs.jsonl" \
  --ref "$OUT/tiny-qwen3"
echo "rewards/accuracies, rewards/margins per step: $OUT/dpo/logging.jsonl"

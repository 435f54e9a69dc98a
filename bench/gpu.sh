#!/usr/bin/env bash
# GPU 检查（一块 GPU，5 分钟内，不下载任何东西）：
#   1. small 预设、CLIP-B/16 + 0.5B Qwen2 尺寸模型在 batch 4/8/16 的训练吞吐、MFU、峰值显存（本项目与 transformers）
#   2. make bench 的两个对比基准在 GPU 上（bf16）
# 用法：
#   bash bench/gpu.sh            # 在有 GPU 的机器上
#   bash bench/gpu.sh --smoke    # 在 CPU 上冒烟，只验证脚本能跑通
# 结果写到 $OUT（默认 bench/results/）下的 JSON 和 gpu.log。
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
{
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
  if [ "${1:-}" = "--smoke" ]; then
    "$PY" bench/bench_sizes.py --smoke --out "$OUT/gpu_sizes.json"
    "$PY" bench/bench_train.py --batch 2 --steps 1 --rounds 1 --no-memory --json > "$OUT/gpu_train.json"
    "$PY" bench/bench_generate.py --batches 1 --new-tokens 4 --rounds 1 --json > "$OUT/gpu_generate.json"
  else
    timeout 200 "$PY" bench/bench_sizes.py --out "$OUT/gpu_sizes.json"
    timeout 45 "$PY" bench/bench_train.py --device cuda --precision bf16 --steps 20 --json > "$OUT/gpu_train.json" || echo "bench_train 超时或失败"
    timeout 45 "$PY" bench/bench_generate.py --device cuda --precision bf16 --json > "$OUT/gpu_generate.json" || echo "bench_generate 超时或失败"
  fi
  cat "$OUT/gpu_train.json" "$OUT/gpu_generate.json" 2>/dev/null || true
  echo "用时 $(( $(date +%s) - start )) 秒"
} 2>&1 | tee "$OUT/gpu.log"

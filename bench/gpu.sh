#!/usr/bin/env bash
# GPU 检查（一块 GPU，约 6～10 分钟，装了 vLLM 时最多约 14 分钟；不下载任何东西）：
#   1. 真实训练路径（bench/bench_real.py）：train_vision_real.py 在生成的图片文件夹上，按配置随机初始化的
#      CLIP-B/16 + Qwen2.5-0.5B（时间够时另有 1.5B、7B），projector / vision+projector / lora 各扫 batch
#      直到显存不够：样本/s、MFU（规格峰值与实测峰值）、最大已分配 / 已保留显存
#   2. 合成训练步：tiny、small 预设与 CLIP-B/16 + 0.5B Qwen2 尺寸，batch 4/8/16，本项目与 transformers（bench/bench_sizes.py）
#   3. make bench 的两个对比基准在 GPU 上（bf16）
#   4. 装了 vLLM 时：同一个导出（bf16）由 vLLM 和 serve.py 分别提供服务，同样的 32 路并发请求，比较 token/s（bench/bench_vllm.py）
# 用法：
#   bash bench/gpu.sh            # 在有 GPU 的机器上
#   bash bench/gpu.sh --smoke    # 在 CPU 上冒烟：同样的代码路径、极小的形状，只验证脚本能跑通
# 结果写到 $OUT（默认 bench/results/）：real.json、real.md（表格）、gpu_*.json 和 gpu.log。每一步有自己的时限。
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
  if [ "${1:-}" = "--smoke" ]; then       # the steps side by side (most of each is imports), each must succeed
    pids=()
    "$PY" bench/bench_real.py --smoke --out "$OUT" & pids+=($!)
    "$PY" bench/bench_sizes.py --smoke --out "$OUT/gpu_sizes.json" & pids+=($!)
    "$PY" bench/bench_train.py --batch 2 --steps 1 --rounds 1 --no-memory --json > "$OUT/gpu_train.json" & pids+=($!)
    "$PY" bench/bench_generate.py --batches 1 --new-tokens 4 --rounds 1 --no-memory --json > "$OUT/gpu_generate.json" & pids+=($!)
    "$PY" bench/bench_vllm.py --ours-only --preset micro --requests 4 --clients 2 --max-tokens 4 --json "$OUT/gpu_vllm.json" & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid"; done
  else
    timeout 310 "$PY" bench/bench_real.py --budget 250 --out "$OUT" || echo "bench_real 超时或失败"
    timeout 90 "$PY" bench/bench_sizes.py --out "$OUT/gpu_sizes.json" || echo "bench_sizes 超时或失败"
    # peak memory is bench_sizes' column; measuring it here again would start four more processes
    timeout 90 "$PY" bench/bench_train.py --device cuda --precision bf16 --steps 20 --no-memory --json > "$OUT/gpu_train.json" || echo "bench_train 超时或失败"
    timeout 90 "$PY" bench/bench_generate.py --device cuda --precision bf16 --no-memory --json > "$OUT/gpu_generate.json" || echo "bench_generate 超时或失败"
    if "$PY" -c "import vllm" 2>/dev/null; then
      timeout 240 "$PY" bench/bench_vllm.py --json "$OUT/gpu_vllm.json" || echo "bench_vllm 超时或失败"
    else
      echo "这台机器没有安装 vLLM，跳过 vLLM 与 serve.py 的对比（pip install vllm 后重跑）"
    fi
  fi
  cat "$OUT/gpu_train.json" "$OUT/gpu_generate.json" 2>/dev/null || true
  echo "用时 $(( $(date +%s) - start )) 秒"
} 2>&1 | tee "$OUT/gpu.log"

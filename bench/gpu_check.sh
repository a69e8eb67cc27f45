#!/usr/bin/env bash
# The GPU paths, checked on a CUDA machine in one go: bf16/fp16 mixed precision, DDP over nccl, FSDP,
# torchao int8 on CUDA (quantize stage, then a latency comparison against bf16 on a SmolLM2-135M-shaped model).
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (wheels for packages the machine lacks may sit in .gpu_wheels/)
set -u
OUT=${1:-${OUT:-outputs/gpu_check}}; mkdir -p "$OUT"
R=$(mktemp -d); export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
[ -d .gpu_wheels ] && python3 -m pip install -q --no-deps --no-index .gpu_wheels/*.whl 2>&1 | tail -2
nvidia-smi -L; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
COMMON="model=llama_tiny trainer.max_steps=60 trainer.val_check_interval=30 logger=csv trainer.enable_progress_bar=false trainer.accelerator=gpu"
step() { local name=$1; shift; local t0=$SECONDS
  if timeout 240 python3 "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name ($((SECONDS-t0)) s)"; else echo "FAIL $name (rc $?)"; tail -5 "$OUT/$name.log"; fi; }
for p in bf16-mixed 16-mixed 32-true; do step "train_$p" recipes/train.py $COMMON precision=$p run_dir=$R/train_$p; done
step ddp_nccl recipes/train.py $COMMON precision=bf16-mixed strategy=ddp run_dir=$R/ddp
step fsdp recipes/train.py $COMMON precision=bf16-mixed strategy=fsdp run_dir=$R/fsdp
for q in int8_weight_only int8_dynamic; do step "quantize_$q" recipes/quantize.py input=$R/train_bf16-mixed quantize=$q trainer.accelerator=gpu run_dir=$R/$q; done
grep -h -o '"backend[^,]*\|nccl' "$OUT/ddp_nccl.log" | sort | uniq -c | head -3
python3 - "$R" <<'PY' | tee "$OUT/summary.txt"
import json, sys, pathlib
for m in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    d = json.loads(m.read_text()); keep = {k: d[k] for k in d if any(s in k for s in ("loss", "ppl", "precision", "size", "quant", "strategy", "device"))}
    print(m.parent.name, json.dumps(keep, default=str)[:400])
PY
timeout 240 python3 bench/gpu_torchao.py 2>&1 | tee "$OUT/torchao.txt" | tail -20

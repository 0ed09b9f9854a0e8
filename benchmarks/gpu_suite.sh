#!/usr/bin/env bash
# The GPU checks of the real configuration, in one run (as the device tool runs them):
# training-step throughput at micro-batches 16, 32, 64 (bf16), one profiled step, the speed
# options against the baseline, batched GradCAM against the per-image loop (2 and 3 classes
# per image), and bf16 against fp32 CAMs. JSON results go to ${OUT:-benchmarks/results}.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
#
# Missing Python packages may be carried as wheels in .whl/ (open_clip_torch, ftfy, wcwidth, timm).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)"
status=0
run() { local name=$1; shift; echo "== $name"; timeout "$@" || { echo "!! $name failed ($?)"; status=1; }; }
run train_step 420 python3 benchmarks/train_step.py --micro-batch 16 32 64 --steps 10 --warmup 3 --profile --compare \
    --out "$OUT/train_step_cuda.json"
run gradcam_2 120 python3 benchmarks/gradcam_throughput.py --batch 16 --classes-per-image 2 --out "$OUT/gradcam_throughput_cuda_2cls.json"
run gradcam_3 120 python3 benchmarks/gradcam_throughput.py --batch 16 --classes-per-image 3 --out "$OUT/gradcam_throughput_cuda_3cls.json"
run bf16 120 python3 benchmarks/bf16_cams.py --batch 16 --out "$OUT/bf16_cams_cuda.json"
run bf16_demo 120 python3 benchmarks/bf16_cams.py --model demo --batch 64 --out "$OUT/bf16_cams_cuda_demo.json"
exit $status

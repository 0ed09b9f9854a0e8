#!/usr/bin/env bash
# The GPU checks of the training step, in one run (about 4 minutes on an H100): each phase of the
# real step with the fast path against today's (reference) operators, the whole step at micro-batch
# 64 and in the voc preset (16 x 8), both with PAR on (step_phases.py); the step's images/s, memory,
# FLOPs and profile at micro-batches 64 and 128 (train_step.py); bf16 CAMs of both paths against
# fp32 on the real shapes (bf16_cams.py); batched GradCAM against the per-image loop
# (gradcam_throughput.py). JSON results go to ${OUT:-benchmarks/results}; the last lines printed
# summarise them.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh            # on the GPU machine
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_suite.sh  # the same scripts on the CPU with tiny shapes
#
# Python packages the GPU machine lacks travel as wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run() { local name=$1; shift; echo "== $name"; timeout "$@" || { echo "!! $name failed ($?)"; status=1; }; }

if [ "${SMOKE:-0}" = 1 ]; then
  cpu=(--device cpu)
  run step_phases 600 $PY benchmarks/step_phases.py "${cpu[@]}" --micro-batch 4 --repeats 1 --out "$OUT/step_phases_cuda_64.json"
  run step_phases_voc 600 $PY benchmarks/step_phases.py "${cpu[@]}" --micro-batch 2 --accumulation 2 --repeats 1 \
      --out "$OUT/step_phases_cuda_voc.json"
  run train_step 600 $PY benchmarks/train_step.py "${cpu[@]}" --micro-batch 2 4 --par on --steps 1 --warmup 1 --profile \
      --out "$OUT/train_step_cuda_fast.json"
  run bf16 600 $PY benchmarks/bf16_cams.py "${cpu[@]}" --model tiny --size 32 --batch 4 --par --out "$OUT/bf16_cams_cuda_fast.json"
  run gradcam_3 600 $PY benchmarks/gradcam_throughput.py "${cpu[@]}" --classes-per-image 3 --repeats 1 \
      --out "$OUT/gradcam_throughput_cuda_3cls_fast.json"
else
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, open_clip, timm; print('torch', torch.__version__, 'triton', triton.__version__, \
'open_clip', open_clip.__version__, 'timm', timm.__version__)"
  run step_phases 150 $PY benchmarks/step_phases.py --micro-batch 64 --repeats 5 --out "$OUT/step_phases_cuda_64.json"
  run step_phases_voc 120 $PY benchmarks/step_phases.py --micro-batch 16 --accumulation 8 --repeats 3 \
      --out "$OUT/step_phases_cuda_voc.json"
  run train_step 120 $PY benchmarks/train_step.py --micro-batch 64 128 --par on --steps 10 --warmup 3 --profile \
      --out "$OUT/train_step_cuda_fast.json"
  run bf16 90 $PY benchmarks/bf16_cams.py --batch 16 --par --out "$OUT/bf16_cams_cuda_fast.json"
  run gradcam_3 60 $PY benchmarks/gradcam_throughput.py --batch 16 --classes-per-image 3 --out "$OUT/gradcam_throughput_cuda_3cls_fast.json"
fi

$PY - "$OUT" <<'EOF' || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
print("== summary (" + ", ".join(p.name for p in sorted(out.glob("*.json"))) + ")")
for name in ("step_phases_cuda_64.json", "step_phases_cuda_voc.json"):
    r = load(name)
    if r:
        s = r["phases"]["step"]
        print(f"{name}: {r['device']}, micro-batch {r['micro_batch']} x {r['accumulation']}: step "
              f"{s['reference']['images_per_s']:.0f} -> {s['fast']['images_per_s']:.0f} images/s (reference -> fast); "
              f"losses within tolerance {r['step_losses_within_tolerance']}; PAR {r['par_check']}; "
              f"host syncs per micro-batch {r['host_syncs_per_micro_batch']}; uint8 exact {r['uint8_to_float_exact']}")
r = load("train_step_cuda_fast.json")
if r:
    for e in r["sizes"]:
        print(f"train_step_cuda_fast.json: micro-batch {e['micro_batch']}: {e['images_per_s']:.0f} images/s, "
              f"peak {e['peak_memory_gib']} GiB, MFU {e.get('mfu_vs_measured')}")
r = load("bf16_cams_cuda_fast.json")
if r:
    print(f"bf16_cams_cuda_fast.json: reference within tolerance {r['within_tolerance']} (labels {r['label_agreement']:.4f}), "
          f"fast within tolerance {r['fast_within_tolerance']} (labels {r['fast_label_agreement']:.4f})")
r = load("gradcam_throughput_cuda_3cls_fast.json")
if r:
    print(f"gradcam_throughput_cuda_3cls_fast.json: fast {r['speedup_fast']:.1f}x, batched {r['speedup_batched']:.1f}x the loop; "
          f"within tolerance {r['within_tolerance']}")
EOF
exit $status

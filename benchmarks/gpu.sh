#!/usr/bin/env bash
# One-GPU speed check (about 5 minutes): the IE-DML pair of WRN-16-2 at 32x32, bf16 autocast and
# channels_last, on CIFAR-100-sized fake data (50000 train / 10000 test random images: this
# measures speed, not accuracy). Prints images/s of the engine and of the hand-written loop, and
# the projected wall time of the 200-epoch CIFAR-100 schedule of recipes/ie_dml_wrn.toml
# (50000 images x 200 epochs / images_per_s + 200 evaluations of the 10000 test images).
# Goal: under 20 minutes on one H100.
#
#   bash benchmarks/gpu.sh                      # writes benchmarks/results/gpu_*.{json,md}
#   COMPILE=1 bash benchmarks/gpu.sh            # the same with run.compile (torch.compile per peer)
#
# Environment overrides (for a dry run on a CPU: DEVICE=cpu FAKE_TRAIN=640 WARMUP=1 STEPS=2 REPEATS=1):
# PYTHON, DEVICE (cuda), FAKE_TRAIN (50000), BATCH (64), WARMUP (50), STEPS (20), REPEATS (15),
# EPOCHS (200), IMPLS (engine,hand), OUT (benchmarks/results), COMPILE (0).
# Installs nothing but this repository (`pip install -e .`), and only when mutualkd is not importable.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import mutualkd, mutualkd_builtins" >/dev/null 2>&1; then
    echo "mutualkd is not importable with $PY: installing this repository (pip install -e .)" >&2
    "$PY" -m pip install -e .
fi

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
TAG=gpu_ie_dml_wrn16_2_bf16_cl
EXTRA=()
if [ "${COMPILE:-0}" = "1" ]; then
    TAG=${TAG}_compile
    EXTRA+=(--compile)
fi

"$PY" - <<'EOF'
import os, platform, subprocess, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda},"
      f" cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0))
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
                              "--format=csv"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
EOF

"$PY" benchmarks/bench_engine.py \
    --device "$DEVICE" --mixed-precision bf16 --channels-last \
    --cases ie_dml_alt_n2 --models cifar_wrn_16_2 \
    --dataset fake-cifar100 --fake-train "${FAKE_TRAIN:-50000}" \
    --impls "${IMPLS:-engine,hand}" --batch-size "${BATCH:-64}" \
    --warmup "${WARMUP:-50}" --steps "${STEPS:-20}" --repeats "${REPEATS:-15}" \
    --project-epochs "${EPOCHS:-200}" --goal-minutes 20 \
    ${EXTRA[@]+"${EXTRA[@]}"} \
    --json-out "$OUT/$TAG.json" --md-out "$OUT/$TAG.md"
echo "written: $OUT/$TAG.json $OUT/$TAG.md"

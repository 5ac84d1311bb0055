#!/usr/bin/env bash
# The Fashion-MNIST study of docs/results.md, in one command:
#
#   bash scripts/run_fashion_mnist_study.sh [OUT_DIR]      (default: runs/fashion_mnist_study)
#
# Trains every arm of recipes/fashion_mnist/ for each seed, in order: the independent arm
# first (peer 0 of its seed-0 run is the IE-KD teacher), then kl_dml, ie_dml and ie_kd;
# then writes `mutualkd report` over all runs into OUT_DIR/report and prints the wall time.
#
# Re-running the command continues: a finished run (summary.json present) is skipped, an
# interrupted one is resumed from its last checkpoint.
#
# Environment: SEEDS (default "0 1"), STUDY_THREADS (torch/OpenMP threads per run,
# default 1: on a shared 2-core machine more threads than free cores slow training down
# by an order of magnitude), MUTUALKD (the command, default .venv/bin/mutualkd when
# present), EXTRA_SET (more --set options for every run, e.g. "run.epochs=1").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-runs/fashion_mnist_study}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SEEDS="${SEEDS:-0 1}"
THREADS="${STUDY_THREADS:-1}"
if [[ -n "${MUTUALKD:-}" ]]; then
  MKD=("$MUTUALKD")
elif [[ -x "$REPO/.venv/bin/mutualkd" ]]; then
  MKD=("$REPO/.venv/bin/mutualkd")
else
  MKD=(mutualkd)
fi
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
EXTRA=()
for s in ${EXTRA_SET:-}; do EXTRA+=(--set "$s"); done
TEACHER_SEED="$(echo $SEEDS | awk '{print $1}')"
TEACHER="$OUT/independent-s$TEACHER_SEED"

log() { echo "[$(date '+%F %T')] $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"; }

{
  echo "start: $(date -Is)"
  echo "host: $(nproc --all) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "torch: $("${MKD[0]%mutualkd}python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"
  echo "threads per run: $THREADS; seeds: $SEEDS"
} | tee "$OUT/machine.txt"

T0=$(date +%s)
# The 1-minute load average, sampled every minute: how much the machine was shared.
( while true; do echo "$(date +%T) $(cut -d' ' -f1-4 /proc/loadavg)" >> "$OUT/load.log"; sleep 60; done ) &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
RUNS=()
run_arm() {  # ARM SEED [--set ...]
  local arm=$1 seed=$2; shift 2
  local name="$arm-s$seed" dir="$OUT/$arm-s$seed"
  RUNS+=("$dir")
  if [[ -f "$dir/summary.json" ]]; then
    log "skip $name: finished earlier"
    return
  fi
  local t=$(date +%s)
  if [[ -d "$dir/checkpoints" ]]; then
    log "resume $name"
    "${MKD[@]}" run --resume "$dir"
  else
    log "start $name"
    "${MKD[@]}" run "$REPO/recipes/fashion_mnist/$arm.toml" \
      --set run.seed="$seed" --set run.name="$name" --set run.out_dir="$OUT" --set run.progress=false \
      "${EXTRA[@]}" "$@"
  fi
  log "done $name in $(( $(date +%s) - t )) s"
}

for seed in $SEEDS; do
  run_arm independent "$seed"
  run_arm kl_dml "$seed"
  run_arm ie_dml "$seed"
  run_arm ie_kd "$seed" --set strategy.teacher="$TEACHER"
done

log "report"
"${MKD[@]}" report "${RUNS[@]}" --out "$OUT/report" || log "the report failed; rerun: mutualkd report ${RUNS[*]} --out $OUT/report"
T1=$(date +%s)
echo "end: $(date -Is)" >> "$OUT/machine.txt"
awk '{ s += $2; n++; if ($2 > m) m = $2 } END { if (n) printf "1-min load average during the study: mean %.1f, max %.1f (%d samples, %s CPUs)\n", s / n, m, n, cpus }' \
  cpus="$(nproc --all)" "$OUT/load.log" | tee -a "$OUT/machine.txt"
echo "total wall time: $(( (T1 - T0) / 60 )) min $(( (T1 - T0) % 60 )) s" | tee -a "$OUT/machine.txt"

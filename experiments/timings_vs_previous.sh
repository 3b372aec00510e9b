#!/usr/bin/env bash
# The bundled model against the one bundled before it (Mclass from git 45662e8^, its card's
# pair 0.0791 / 0.8779, TTA), interleaved in one run: fresh CLI processes timed from outside,
# counts on four ICPR fields and on the 20x skin slide, then bench_slide.py.
# Usage (idle machine): bash experiments/timings_vs_previous.sh [OUT_DIR] > OUT.txt 2>&1
# (bench_slide.py's JSON goes to OUT_DIR, default experiments/results/timings_vs_previous)
set -u
cd "$(dirname "$0")/.."
FK=.venv/bin/focas-keras
DET=focas_keras/pretrained/icpr2012_cpu/det
NEW=focas_keras/pretrained/icpr2012_cpu/cls
SHARED=../shared/data
OUT=$(realpath -m "${1:-experiments/results/timings_vs_previous}"); mkdir -p "$OUT"
WORK=$(mktemp -d)
OLD=$WORK/old_cls; mkdir -p "$OLD" "$WORK/four"
for f in model.keras config.json run.json; do
  git show "45662e8^:focas_keras/pretrained/icpr2012_cpu/cls/$f" > "$OLD/$f"
done
for f in A00_00 A01_04 A02_00 A04_03; do ln -sf "$(realpath $SHARED/icpr2012/images/$f.jpg)" "$WORK/four/"; done
PREV=(--det $DET --cls $OLD --det-threshold 0.0791 --cls-threshold 0.8779 --tta)
t() { local s=$(date +%s.%N); "$@" > "$WORK/out.txt" 2>&1; local rc=$?
      echo "$(echo "$(date +%s.%N) - $s" | bc) s rc=$rc :: $*"; grep -a "mitoses in" "$WORK/out.txt" | head -1; }
echo "date: $(date -u)"; uptime
.venv/bin/python -c "import sys; sys.path.insert(0,'experiments'); from bench_presets import matmul_gflops; print('matmul GFLOP/s', round(matmul_gflops(),1))" 2>/dev/null
for i in 1 2; do t $FK demo --out "$WORK/demo" --overwrite; done
SAMPLE=$(.venv/bin/python -c "from focas_keras import pretrained; print(pretrained.sample_field())" 2>/dev/null)
for i in 1 2; do
  t $FK detect "$SAMPLE" --out "$WORK/d1" --overwrite --no-overlays
  t $FK detect "$SAMPLE" "${PREV[@]}" --out "$WORK/d1o" --overwrite --no-overlays
  t $FK detect "$WORK/four" --out "$WORK/d4" --overwrite --no-overlays
  t $FK detect "$WORK/four" "${PREV[@]}" --out "$WORK/d4o" --overwrite --no-overlays
done
t $FK detect "$WORK/four" --det $DET --cls $NEW --det-threshold 0.0791 --cls-threshold 0.7674 --tta --out "$WORK/d4n" --overwrite --no-overlays
for d in d4 d4o d4n; do echo "$d"; cat "$WORK/$d/counts.csv"; done
S=$SHARED/slides/CMU-1-Small-Region.svs
for i in 1 2; do t $FK slide $S --out "$WORK/s" --overwrite --allow-coarser; done
t $FK slide $S "${PREV[@]}" --out "$WORK/so" --overwrite --allow-coarser
t $FK slide $S --det $DET --cls $OLD --det-threshold 0.05 --cls-threshold 0.8779 --tta --out "$WORK/so5" --overwrite --allow-coarser
t $FK slide $S --det $DET --cls $NEW --det-threshold 0.0791 --cls-threshold 0.7674 --tta --out "$WORK/sn79" --overwrite --allow-coarser
.venv/bin/python experiments/bench_slide.py --repeats 1 --json "$OUT/bench_slide.json" 2>&1 | tail -25
echo "end: $(date -u)"; rm -rf "$WORK"

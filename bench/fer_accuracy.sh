#!/usr/bin/env bash
# FER-2013 accuracy runs of the README's results table, on CPU, with the stage scripts themselves.
#
# Needs the preprocessed FER-2013 artifacts of `python bench/dvc_overhead.py` (default /tmp/ferpipe-dvc:
# data/gray48, data/guides, data/split for task polarity). Writes one folder per run under OUT with
# models/, train.json (per fold + mean/std validation accuracy), eval.json (PublicTest), logs.
#
#   bench/fer_accuracy.sh polarity baseline original soft     # 3-class, 5 folds, 20 cosine epochs each
#   bench/fer_accuracy.sh classes7                            # 7-class vgg, fold 0, 40 cosine epochs, TTA 0/4/10
#
# Each run uses one thread (TRAIN_THREADS), so two invocations can share a 2-core machine.
# EXTRA adds train overrides (both modes), SUFFIX a folder-name suffix (polarity), e.g.
#   SUFFIX=_loc01 EXTRA="-S train.folds=[2] -S train.localization_lr=0.1" bench/fer_accuracy.sh polarity soft
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-/tmp/ferpipe-dvc}/data
OUT=${OUT:-/tmp/ferpipe-accuracy}
T=${TRAIN_THREADS:-1}
export OMP_WAIT_POLICY=PASSIVE
PY=.venv/bin/python
what=$1; shift

run() {  # name model split.csv extra -S overrides...
  local name=$1 model=$2 split=$3; shift 3
  local o=$OUT/$name; mkdir -p "$o"
  /usr/bin/time -f "train wall %e s, cpu %U+%S s" $PY stages/train.py -S model="$model" --split "$split" \
    --gray48 $D/gray48/images.h5 --guides $D/guides --models "$o/models" --metrics "$o/train.json" \
    --live "$o/dvclive" --curves "$o/curves.png" -S train.threads=$T "$@" > "$o/train.log" 2>&1
  tail -n 1 "$o/train.log"
}

evaluate() {  # name split.csv tta
  local o=$OUT/$1
  $PY stages/evaluate.py --models "$o/models" --split "$2" --gray48 $D/gray48/images.h5 --guides $D/guides \
    --metrics "$o/eval_tta$3.json" --results "$o/results_tta$3.json" --train-metrics "$o/train.json" --predictions "$o/predictions_tta$3.csv" --confusion "$o/confusion_tta$3.png" \
    --errors "$o/errors_tta$3.png" -S evaluate.threads=$T -S evaluate.tta=$3 > "$o/eval_tta$3.log" 2>&1
  grep -E "^accuracy" "$o/eval_tta$3.log" | sed "s/^/$1 tta $3 PublicTest /"
}

case $what in
  polarity)
    for m in "$@"; do
      # shellcheck disable=SC2086  # EXTRA is a list of words
      run "$m${SUFFIX:-}" "$m" $D/split/split.csv -S train.max_epochs=20 -S train.patience=10 \
        -S train.lr_schedule=cosine ${EXTRA:-}
      evaluate "$m${SUFFIX:-}" $D/split/split.csv 0
    done ;;
  classes7)
    mkdir -p "$OUT"
    $PY stages/split.py --manifest $D/ingest/manifest.csv --out "$OUT/split7.csv" --summary "$OUT/split7.json" \
      -S task=classes > /dev/null
    # shellcheck disable=SC2086
    run vgg7 vgg "$OUT/split7.csv" -S 'train.folds=[0]' -S train.max_epochs=40 -S train.patience=0 \
      -S train.lr_schedule=cosine -S train.class_weights=false ${EXTRA:-}
    for tta in 0 4 10; do evaluate vgg7 "$OUT/split7.csv" $tta; done ;;
  *) echo "usage: $0 polarity MODEL... | classes7" >&2; exit 2 ;;
esac

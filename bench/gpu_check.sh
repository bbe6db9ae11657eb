#!/usr/bin/env bash
# One run on a GPU machine (the session's device tool; CI never has one): the CUDA, mixed-precision
# and DDP paths end to end on FER-2013 7-class, and the cpu60 recipe search (bench/recipe_search.py).
# Needs the packed data of `bench/recipe_search.py --pack .carry/fer7pack` and writes to $OUT.
#   FER-2013 epoch time of `baseline` on CUDA, fp32 and bf16 autocast (fold 0: 22.6k rows + validation);
#   DDP: torchrun with 2 CPU processes (gloo), one epoch; the search, stopped at its deadline.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
OUT=${OUT:-/tmp/gpu_check}; W=/tmp/gpu_work; mkdir -p "$OUT" $W
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import recipe_search as r; r.unpack(Path('.carry/fer7pack'), Path('$W'))"
common=(--split .carry/fer7pack/split.csv --gray48 $W/gray48.h5 --guides $W/none --live "" --curves "" -S model=baseline
        -S 'train.folds=[0]' -S train.log_every=1)
for amp in false true; do
  python3 stages/train.py "${common[@]}" --models $W/m_amp$amp --metrics $W/t_amp$amp.json \
    -S train.device=cuda -S train.amp=$amp -S train.max_epochs=3 2>&1 | grep -E "^train|^fold|epoch" | tee "$OUT/cuda_amp_$amp.log"
done
(python3 -m torch.distributed.run --nproc_per_node 2 stages/train.py "${common[@]}" \
  --models $W/m_ddp --metrics $W/t_ddp.json -S train.device=cpu -S train.threads=2 -S train.max_epochs=1 > "$OUT/ddp_cpu.log" 2>&1;
 echo "ddp exit $?" >> "$OUT/ddp_cpu.log") &
python3 bench/recipe_search.py --data .carry/fer7pack --out $W/search --device cuda --deadline "${DEADLINE:-420}" ${ONLY:+--only $ONLY} \
  > "$OUT/search.log" 2>&1
wait
tail -n 14 "$OUT/search.log"
tail -n 3 "$OUT/ddp_cpu.log"
tar czf "$OUT/search.tgz" -C $W --exclude='*.h5' --exclude='fold0_*/models' search
ls -la "$OUT"

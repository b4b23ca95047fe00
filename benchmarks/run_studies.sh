#!/usr/bin/env bash
# The six studies of docs/studies.md on SmolLM2-135M, sized to take about an hour together on a
# 2-core CPU (short runs: 3-60 steps of batch 8 or 16, 200 test rows; the papers run 20,000
# steps). Resumable: run it again and finished runs are skipped.
#
#   nice -n 19 bash benchmarks/run_studies.sh [study ...]      # default: all six, in this order
#
# Results: benchmarks/results/studies/NAME.jsonl (records) and NAME.md (the rendered table);
# figures: docs/figures/studies/. Also run for docs/studies.md (ZO-SGD with 5x the steps):
#   zotune study alignment --task sst2 --values mezo --steps 150 --batch-size 8 --test 200 \
#     --results benchmarks/results/studies/alignment-mezo-150.jsonl --output-dir runs/studies/alignment-mezo-150 \
#     --out benchmarks/results/studies/alignment-mezo-150.md
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results/studies
FIG=docs/figures/studies
mkdir -p "$OUT" "$FIG"
declare -A ARGS=(
  [lozo-memory]="--steps 5 --batch-size 16"
  [hybrid]="--values 0,10,20,30 --steps 60 --batch-size 8 --test 200"
  [alignment]="--task sst2 --steps 30 --batch-size 8 --test 200"
  [queries]="--values 1,2,4 --steps 20 --batch-size 8 --test 200"
  [sparsity]="--task sst2 --values 0,20,50 --steps 30 --batch-size 8 --test 200"
  [block]="--task sst2 --steps 3 --batch-size 8 --test 200"
)
studies=("$@")
[ ${#studies[@]} -eq 0 ] && studies=(lozo-memory hybrid alignment queries sparsity block)
for s in "${studies[@]}"; do
  echo "== $(date -u +%H:%M:%S) zotune study $s ${ARGS[$s]}" >&2
  # shellcheck disable=SC2086
  python3 -m zotune.cli study "$s" ${ARGS[$s]} --out "$OUT/$s.md" --figures "$FIG" > /dev/null
  rc=$?
  echo "== $(date -u +%H:%M:%S) $s: exit $rc" >&2
done

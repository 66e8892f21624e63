#!/usr/bin/env bash
# Wall time of the quickstart's distill stage at two commits, interleaved, on one trained teacher
# and seed, with exact FA (the quickstart's recipe until issue 24; it runs KD only since); each run is
# then evaluated on the test split.
#   bash benchmarks/quickstart_wall.sh <before-commit> <teacher.keras> <out-dir> [rounds]
# Prints "<commit> round <r> wall <s> s user <s> s" and "<commit> round <r> student <acc> teacher <acc>".
set -euo pipefail
before=$1; teacher=$(realpath "$2"); out=$(realpath -m "$3"); rounds=${4:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
after=$(git -C "$repo" rev-parse --short HEAD)
mkdir -p "$out"
trees=()
for commit in "$before" "$after"; do
  tree="$out/tree-$commit"
  [ -d "$tree" ] || git -C "$repo" worktree add --detach "$tree" "$commit" >/dev/null
  trees+=("$tree")
done
for round in $(seq 1 "$rounds"); do
  for tree in "${trees[@]}"; do
    commit=$(basename "$tree"); commit=${commit#tree-}; run="$out/$commit-$round"
    rm -rf "$run"
    (cd "$tree" && /usr/bin/time -f "$commit round $round wall %e s user %U s" python train.py \
        --config configs/quickstart.json --stage distill --set teacher.file="$teacher" \
        --set distill.fa=exact --set output_dir="$run" >"$run.log" 2>&1) || { echo "$commit round $round failed: $run.log"; exit 1; }
    tail -1 "$run.log"
    (cd "$tree" && python train.py --config configs/quickstart.json --stage evaluate \
        --set teacher.file="$teacher" --set output_dir="$run" >"$run.eval.log" 2>&1)
    python -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], 'student', r['student']['accuracy'], 'teacher', r['teacher']['accuracy'])" \
        "$run/results.json" "$commit round $round"
  done
done

#!/usr/bin/env bash
# The whole test suite under the kernel settings another CPU gives (issue 33): oneDNN capped at AVX2
# (a CPU without AVX-512/AMX), oneDNN off (Eigen kernels), one intra-op thread. One line per setting
# with its exit code, seconds and pytest's summary; the full logs go to $LOGS (default /tmp).
cd "$(dirname "$0")/.."
LOGS=${LOGS:-/tmp}
for v in "ONEDNN_MAX_CPU_ISA=AVX2" "TF_ENABLE_ONEDNN_OPTS=0" "TF_NUM_INTRAOP_THREADS=1 OMP_NUM_THREADS=1"; do
  tag=$(echo "$v" | cut -d= -f1)
  start=$(date +%s)
  env $v "${PYTHON:-python3}" -m pytest -n 2 -q -p no:cacheprovider > "$LOGS/suite_$tag.log" 2>&1
  rc=$?
  echo "$v rc=$rc $(( $(date +%s) - start ))s $(grep -E '(passed|failed)' "$LOGS/suite_$tag.log" | tail -1)"
done

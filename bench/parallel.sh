#!/usr/bin/env bash
# Several runner processes over one shared plan, e.g. on a borrowed GPU machine:
#
#   bench/parallel.sh MINUTES DIR -- "recon.py --parts main selector" 6 "contrastive.py" 6
#
# starts 6 workers of each runner (run from bench/, with --claims DIR so that each cell
# runs once and --max-minutes MINUTES so that no cell starts after that), plus whatever
# RUNNER_ARGS holds (e.g. RUNNER_ARGS="--device cuda --data-root ../.fmnist"). Every cell
# is appended to bench/results/*.cells.jsonl when it ends; worker logs go to DIR/*.log.
# Workers are one-threaded (OMP_NUM_THREADS=1): many processes, not many threads.
# Each worker writes the tables from the cells it had read or run, so the last one to
# stop misses the others' later cells: rerun the runner with --report-only afterwards.
set -euo pipefail
minutes=$1 dir=$2
shift 2
[[ ${1:-} == -- ]] && shift
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# Claims of an earlier run would block the cells it left unfinished.
rm -rf "$dir/claims"
pids=()
while (($# >= 2)); do
    runner=$1 count=$2
    shift 2
    for ((i = 0; i < count; i++)); do
        log="$dir/$(echo "$runner" | cut -d' ' -f1 | cut -d. -f1)-$i.log"
        # shellcheck disable=SC2086  # the runner string carries its own arguments
        (cd "$here" && OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
            "$python" $runner --claims "$dir/claims" --max-minutes "$minutes" \
            ${RUNNER_ARGS:-} >"$log" 2>&1) &
        pids+=($!)
        sleep 2 # staggered starts: the first cells of the plan go to different workers
    done
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"

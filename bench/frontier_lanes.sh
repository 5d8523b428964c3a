#!/usr/bin/env bash
# The full frontier protocol as two lanes of one-thread jobs (2 cores), each a queue of rows x seeds 0 1 2,
# most informative first. Resumable: finished runs are skipped, an interrupted one resumes from its
# checkpoint, so after a stop run this again.  Logs: bench/logs/lane-{a,b}.log.
#
#     nohup bash bench/frontier_lanes.sh &        # then: python bench/frontier.py table
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/logs
lane() {  # lane NAME ROW...: every row with seeds 0 1 2, in order
  local name=$1; shift
  for row in "$@"; do
    "$PY" bench/frontier.py run --rows "$row" --seeds 0 1 2 --threads 1 >> "bench/logs/lane-$name.log" 2>&1
  done
}
lane a dense remove-0.9 sparse-rolling-0.7 mixed-ng-rolling-fa-0.7 &
lane b sparse-rolling-0.9 sparse-0.9 mixed-ng-rolling-fa-0.9 &
wait

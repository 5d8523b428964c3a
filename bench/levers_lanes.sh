#!/usr/bin/env bash
# Screening the levers users already have (issue "What a small device should run"): 30 rounds, seed 0, the
# frontier's protocol otherwise, one-thread lanes (2 cores). Resumable like frontier_lanes.sh: finished screens are
# skipped, an interrupted one resumes from its checkpoint while the checkout keeps bench/results/.
#
#     nohup bash bench/levers_lanes.sh &        # then: python bench/frontier.py table
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/logs
lane() {  # lane NAME ROW...: screens the rows in order
  local name=$1; shift
  for row in "$@"; do
    "$PY" bench/frontier.py screen --rows "$row" --threads 1 >> "bench/logs/levers-$name.log" 2>&1
  done
}
lane a dense-steps6 dense-up4 dense-top4 &
lane b dense-steps5 dense-up2 dense-top5 &
wait

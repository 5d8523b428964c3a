#!/usr/bin/env bash
# The frontier protocol as lanes of one-thread jobs (2 cores), each a queue run in order: ROW runs the row
# with seeds 0 1 2 (60 rounds), ROW@S with seed S only, screen:ROW screens it (30 rounds, seed 0,
# docs/results/screen30/). dense-freeze_a@0 and sparse-rolling-fa-0.9@0 (its 30-round screen extended to 60)
# split the compute-saving row's gap: A frozen on dense, then with sparse heads. Resumable: finished runs are
# skipped and an interrupted one resumes from its checkpoint, so after a stop run this again. The run folders
# (bench/results/, not committed) live only as long as the checkout: a fresh clone keeps the records alone, so
# an unfinished run starts over there (`python bench/frontier.py status` shows what is missing and how far runs are).
# Logs: bench/logs/lane-<name>.log.
#
#     nohup bash bench/frontier_lanes.sh &        # then: python bench/frontier.py table
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/logs
lane() {  # lane NAME ITEM...
  local name=$1; shift
  for item in "$@"; do
    if [[ $item == screen:* ]]; then
      "$PY" bench/frontier.py screen --rows "${item#screen:}" --threads 1 >> "bench/logs/lane-$name.log" 2>&1
    elif [[ $item == *@* ]]; then
      "$PY" bench/frontier.py run --rows "${item%@*}" --seeds "${item#*@}" --threads 1 >> "bench/logs/lane-$name.log" 2>&1
    else
      "$PY" bench/frontier.py run --rows "$item" --seeds 0 1 2 --threads 1 >> "bench/logs/lane-$name.log" 2>&1
    fi
  done
}
# Done (seed 0 or screens): dense, sparse-rolling-0.9, sparse-0.9, mixed-ng-rolling-fa-0.9, dense-freeze_a,
# sparse-rolling-fa-0.9, the alpha-64 rows, dense-fa-principal and mixed-ng-rolling-fapc-0.9 (60 rounds), and the
# screens in docs/results/screen30/. A principal frozen A beat the random one at 60 rounds (0.4633 against 0.4317
# in the compute-saving row), so the compute-saving row's seeds and its 70% row are the principal-A ones.
# A at the inputs' principal directions on random tokens (init_a = input_principal) was screened at 30 rounds
# (session 11) and learned no better than a random frozen A: not extended.
# The protocol is complete (session 16): its 7 rows (frontier.PROTOCOL_ROWS) with seeds 0-2 each. The lanes below
# are the whole protocol, so in a checkout that has the records they skip every run and end at once (`python
# bench/frontier.py status` shows none missing); from empty records they run all 21 runs, two one-thread lanes
# (about 55-63 s a round for train_sparse here, 38-41 s for remove, + about 8 minutes of scoring a run: 10-13
# hours a lane). To rerun one run, delete its record and `python bench/frontier.py run --rows ROW --seeds S`.
lane a dense sparse-0.9 remove-0.9 sparse-rolling-0.7 &
lane b sparse-rolling-0.9 mixed-ng-rolling-fapc-0.9 mixed-ng-rolling-fapc-0.7 &
wait

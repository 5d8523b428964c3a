#!/usr/bin/env bash
# The budget frontier's protocol runs (issue "What a small device should run") as two one-thread lanes (2 cores):
# the save_upload and save_compute presets' rows with 3 seeds (60 rounds; seed 0 extends its 30-round screen),
# then the mixed federation's rows. Resumable: a finished run is skipped, an interrupted one resumes from its
# checkpoint in bench/results/ (kept as long as the checkout: a new session's checkout starts them again). `python bench/frontier.py status` shows progress.
#
#     nohup bash bench/budget_lanes.sh &  # or one lane: bash bench/budget_lanes.sh a   # then: python bench/budget.py table; python bench/heterogeneous.py table
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/logs
lane() {  # lane NAME ITEM...: ROW@SEED runs a frontier row, mixfed:ROW@SEED a mixed-federation row
  local name=$1; shift
  for item in "$@"; do
    local row=${item%@*} seed=${item#*@}
    if [[ $row == screen:* ]]; then  # a 30-round screen, records in docs/results/screen30
      [[ -e docs/results/screen30/${row#screen:}.seed$seed.json ]] ||
        "$PY" bench/frontier.py screen --rounds 30 --rows "${row#screen:}" --seeds "$seed" --threads 1 >> "bench/logs/budget-$name.log" 2>&1
    elif [[ $row == mixfed:* ]]; then
      "$PY" bench/heterogeneous.py run --rows "${row#mixfed:}" --seeds "$seed" --threads 1 >> "bench/logs/budget-$name.log" 2>&1
    else
      "$PY" bench/frontier.py run --rows "$row" --seeds "$seed" --threads 1 >> "bench/logs/budget-$name.log" 2>&1
    fi
  done
}
# seed 0 of each mixed-federation row first (a screen of the comparison), then seeds 1 and 2, balanced by length;
# then the weak devices on small batches (mixfed-weak-b8), the budget screen of a smaller batch (dense-b16) and
# its protocol seeds (the FLOPs >= 1.5x budget's candidate), the screen of the upload >= 10x budget's candidate
# (rank-4 LoRA, 4-bit deflated upload: 7.9 points below dense's screen, so no protocol), then the weak devices on
# batches of 16 as micro-batches of 8 (mixfed-weak-b16m8), then the upload >= 10x budget's protocol: 2-bit upload
# (dense-up2; deflated, dense-up2-z, 14.6x, trains exactly as it), and the screen of 3 bits deflated (dense-up3-z,
# 9.35x: short of 10x, the closest lever by bits)
only=${1:-ab}  # run only lane a or b: `bash bench/budget_lanes.sh a`
[[ $only == *a* ]] && lane a dense-up4@0 dense-up4@1 dense-up4@2 \
  mixfed:mixfed-capable-only@0 mixfed:mixfed-weak-ckpt@0 mixfed:mixfed-weak-heads@1 \
  mixfed:mixfed-capable-only@2 mixfed:mixfed-weak-b8@1 screen:dense-b16@0 mixfed:mixfed-weak-ckpt@2 dense-b16@1 \
  mixfed:mixfed-weak-b16m8@1 mixfed:mixfed-weak-b16m8@2 dense-up2@1 screen:dense-up3-z@0 &
[[ $only == *b* ]] && lane b dense-steps6@0 dense-steps6@1 dense-steps6@2 \
  mixfed:mixfed-weak-heads@0 mixfed:mixfed-capable-only@1 mixfed:mixfed-weak-ckpt@1 mixfed:mixfed-weak-heads@2 \
  mixfed:mixfed-weak-b8@0 mixfed:mixfed-weak-b8@2 dense-b16@0 screen:dense-r4-up4-z@0 dense-b16@2 \
  mixfed:mixfed-weak-b16m8@0 dense-up2@0 dense-up2@2 &
wait

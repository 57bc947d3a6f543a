#!/usr/bin/env bash
# One GPU session's work, in the background, so that it outlives the device
# tool's 10-minute limit per command (a process in its own session survives
# the command that started it, until the machine goes back).
#
#   bash benchmarks/device_session.sh start   # after the bundle printed READY; returns at once
#   bash benchmarks/device_session.sh poll    # progress; copies finished logs to $OUT
#
# Order = priority (a machine is held 30 minutes at most): throughput of every
# workload and backend, the token check, GPU tests, the kernel benchmark.
# A step that fails does not stop the next; each step's log says how it ended.
set -u
RUN=${CASCADE_RUN_DIR:-/root/cascade-run}
case "${1:-}" in
start)
    mkdir -p "$RUN"
    setsid nohup bash -c '
        source benchmarks/device_env.sh
        step() { name=$1; shift; echo "$(date +%T) start $name" >> '"$RUN"'/progress
                 "$@" > '"$RUN"'/$name.log 2>&1; rc=$?; echo "$(date +%T) end $name rc=$rc" >> '"$RUN"'/progress; }
        step throughput python3 benchmarks/throughput.py --model .models/qwen3-0.6b \
            --backends FLASHINFER,CASCADE,FLASH_ATTN --log-dir '"$RUN"'
        step gpu-check python3 benchmarks/gpu_check.py --model .models/qwen3-0.6b \
            --backends FLASH_ATTN,CASCADE --log-dir '"$RUN"'
        step gpu-tests python3 -m pytest -q tests/test_triton_cascade.py tests/test_gpu_attention.py
        step kernel-bench python3 benchmarks/kernel_bench.py
        echo "$(date +%T) all done" >> '"$RUN"'/progress
    ' > "$RUN/session.log" 2>&1 < /dev/null &
    echo "started in the background; poll with: bash benchmarks/device_session.sh poll"
    ;;
poll)
    cat "$RUN/progress" 2>/dev/null || echo "nothing started"
    for log in "$RUN"/*.log; do
        [ -f "$log" ] || continue
        echo "== $(basename "$log"): $(tail -n 1 "$log" | cut -c1-200)"
    done
    # What comes back: at most 8 files; the step logs, then the tails of the per-backend engine logs.
    if [ -n "${OUT:-}" ]; then
        for f in progress gpu-tests.log kernel-bench.log throughput.log gpu-check.log session.log; do
            [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
        done
        for log in "$RUN"/tput-*.log "$RUN"/check-*.log; do
            [ -f "$log" ] && { echo "=== $(basename "$log")"; tail -n 80 "$log"; }
        done > "$OUT/engine-tails.txt" 2>/dev/null
    fi
    ;;
*)
    echo "usage: bash benchmarks/device_session.sh start|poll" >&2
    exit 2
    ;;
esac

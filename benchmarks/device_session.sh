#!/usr/bin/env bash
# One GPU session's work, in the background, so that it outlives the device
# tool's 10-minute limit per command (a process in its own session survives
# the command that started it, until the machine goes back).
#
#   bash benchmarks/device_session.sh start STEP[:SECONDS]...   # after the bundle printed READY; returns at once
#   bash benchmarks/device_session.sh poll            # progress; copies finished logs to $OUT
#
# Steps run in the order given (a machine is held 30 minutes at most, so put
# first what matters most): host-bench, step-profile (profile-ceiling: CASCADE on short and shared), throughput, gpu-check (gpu-check-workloads: on the shared and
# groups prompts, against FLASH_ATTN and FLASHINFER; gpu-check-ref: CASCADE and FLASH_ATTN only, each with the fp32 reference),
# gpu-tests (the end-to-end chunk tests first; gpu-chunks: those alone; triton-tests: the kernel tests alone; attn-tests: both paths'
# kernel tests, bf16 at the model's shapes included), kernel-bench (the nosharing and shared decode shapes;
# kernel-shared: the shared shape alone (kernel-breakdown: with each kernel of a layer profiled; kernel-groups: the
# groups shape, three levels, profiled; ncu-shared, ncu-groups: Nsight Compute on those shapes' decode launches); fused-tests: test_fused_qwen3.py; branch-fi, branch-triton, branch-kernel, branch-chunks: fi-tests, the Triton kernel tests, kernel-breakdown and stock FLASHINFER against CASCADE's chunks_bench on the tree
# unpacked in .branch (branch-sweep, branch-groups, branch-nosharing: kernel_bench --sweep at the shared shape, kernel-groups,
# the nosharing and single decode shapes; branch-tput: throughput's shared and groups, FLASHINFER and CASCADE); chunk-tests: the end-to-end chunk tests alone; rope-tests: the kernel tests of chunk steps and
# of queries before RoPE (query_rope), both GPU paths; rope-e2e: the fused class on CASCADE, query_rope model and backend;
# kernel-single: the single workload's batch-1 decode shape, with and without fill_programs;
# kernel-sweep: launch settings at the
# nosharing and shared shapes), prefill-bench (one layer of the composed-chunks prefill step: the chunk
# kernel's settings against FlashInfer's prefill kernel), model-bench (model-bench-64: batch-64 decode of stock,
# fused and fused-noaddmm on FLASH_ATTN, then on CASCADE; model-bench-8b: stock and
# fused on the Qwen3-8B config), model-check (fused vs stock Qwen3 logprobs, bf16 against fp32, on the
# 0.6B and 8B configs; model-check-unit: 0.6B with unit norm weights, so folding them is exact),
# chunks-bench (chunks-profile: orders only, in-process engines, the first steps profiled; chunks-fi: stock,
# CASCADE and CASCADE with chunk_prefill_kernel=triton; fi-tests: the FlashInfer path's tests), nosharing
# (throughput of nosharing and shared, FLASHINFER and CASCADE), ceiling (throughput's short, shared and groups:
# FLASHINFER, CASCADE, CASCADE with the fused Qwen3 class). With no STEP: throughput
# gpu-check gpu-tests kernel-bench. A step that fails does not stop the next;
# each step's log says how it ended.
set -u
RUN=${CASCADE_RUN_DIR:-/root/cascade-run}
M=.models/qwen3-0.6b
# A branch step runs in its own copy of .branch: each device call replaces .branch, which took the
# working directory from under a step that ran across a poll (fourteenth session).
in_branch() { rm -rf .branch-run && cp -r .branch .branch-run && cd .branch-run; }
run_step() {
    case "$1" in
    host-bench) python3 benchmarks/host_bench.py ;;
    step-profile) python3 benchmarks/step_profile.py --model $M --workloads single,shared \
                      --backends FLASH_ATTN,CASCADE --log-dir "$RUN" ;;
    profile-ceiling) python3 benchmarks/step_profile.py --model $M --workloads short,shared --backends CASCADE \
                         --log-dir "$RUN" ;;
    throughput) python3 benchmarks/throughput.py --model $M --backends FLASHINFER,CASCADE,FLASH_ATTN --log-dir "$RUN" ;;
    gpu-check) python3 benchmarks/gpu_check.py --model $M --backends FLASH_ATTN,CASCADE --log-dir "$RUN" ;;
    gpu-check-workloads) python3 benchmarks/gpu_check.py --model $M --backends FLASH_ATTN,FLASHINFER,CASCADE \
                             --workloads shared,groups --log-dir "$RUN" ;;
    gpu-check-ref) python3 benchmarks/gpu_check.py --model $M --backends FLASH_ATTN,CASCADE --workloads groups,shared \
                       --log-dir "$RUN" ;;
    gpu-tests) python3 -m pytest -q tests/test_gpu_chunks.py tests/test_gpu_attention.py tests/test_uniform_segments.py tests/test_triton_cascade.py tests/test_fused_qwen3.py ;;
    gpu-chunks) python3 -m pytest -q -rP tests/test_gpu_chunks.py ;;
    triton-tests) python3 -m pytest -q tests/test_triton_cascade.py tests/test_uniform_segments.py tests/test_chunk_pages.py ;;
    fi-tests) python3 -m pytest -q tests/test_gpu_attention.py tests/test_uniform_segments.py ;;
    attn-tests) python3 -m pytest -q tests/test_triton_cascade.py tests/test_gpu_attention.py ;;
    rope-tests) python3 -m pytest -q tests/test_triton_cascade.py tests/test_gpu_attention.py -k "rope or chunk" ;;
    # It hung twice with no line logged; -s streams the engines' logs; every process (the test's, the engine core's, the
    # worker's) dumps its threads' stacks after 300 s / every 240 s (plugin.py: CASCADE_DUMP_STACKS_S).
    rope-e2e) CASCADE_DUMP_STACKS_S=240 python3 -m pytest -q -s -rP -o faulthandler_timeout=300 tests/test_fused_qwen3.py \
                  -k "gpu_query_before_rope" ;;
    kernel-bench) python3 benchmarks/kernel_bench.py --prefix 0 --own 4352; python3 benchmarks/kernel_bench.py ;;
    kernel-single) python3 benchmarks/kernel_bench.py --batch 1 --prefix 0 --own 640 ;;
    prefill-bench) python3 benchmarks/prefill_bench.py ;;
    kernel-sweep) python3 benchmarks/kernel_bench.py --prefix 0 --own 4352 --sweep; python3 benchmarks/kernel_bench.py --sweep ;;
    model-bench) python3 benchmarks/model_bench.py --model $M --variants stock,fused,fused-noaddmm --log-dir "$RUN" ;;
    model-bench-64) for b in FLASH_ATTN CASCADE; do mkdir -p "$RUN/$b"; python3 benchmarks/model_bench.py --model $M \
                        --backend $b --variants stock,fused,fused-noaddmm --workloads decode64 --log-dir "$RUN/$b"; done ;;
    model-bench-8b) python3 benchmarks/model_bench.py --model .models/qwen3-8b --variants stock,fused --log-dir "$RUN" ;;
    model-check) python3 benchmarks/model_check.py --model $M,.models/qwen3-8b --log-dir "$RUN" ;;
    model-check-8b) python3 benchmarks/model_check.py --model .models/qwen3-8b --log-dir "$RUN" ;;
    chunks-bench) python3 benchmarks/chunks_bench.py --model $M --log-dir "$RUN" ;;
    chunks-fi) python3 benchmarks/chunks_bench.py --model $M --backends FLASHINFER,CASCADE,CASCADE:chunk_prefill_kernel=triton \
                   --log-dir "$RUN" ;;
    chunks-profile) python3 benchmarks/chunks_bench.py --model $M --variants orders --backends ${CHUNKS_BACKENDS:-FLASHINFER,CASCADE} --profile-steps 3 --log-dir "$RUN" ;;
    ceiling) python3 benchmarks/throughput.py --model $M --workloads short,shared,groups \
                 --backends FLASHINFER,CASCADE,CASCADE:model=fused --log-dir "$RUN" ;;
    nosharing) python3 benchmarks/throughput.py --model $M --workloads nosharing,shared --backends FLASHINFER,CASCADE \
                   --log-dir "$RUN" ;;
    model-check-unit) python3 benchmarks/model_check.py --model $M --unit-norms --log-dir "$RUN" ;;
    chunk-tests) python3 -m pytest -q tests/test_chunk_pages.py ;;
    kernel-shared) python3 benchmarks/kernel_bench.py ;;
    kernel-breakdown) python3 benchmarks/kernel_bench.py --breakdown ;;
    kernel-groups) python3 benchmarks/kernel_bench.py --prefix 512 --groups 4 --doc 4096 --breakdown ;;
    # Nsight Compute on the backend's decode launches (eager; the first layer's three, which compile, skipped;
    # ncu flushes the caches before each): throughput against peak, memory, compute pipes, occupancy, warp stalls and where
    # in the code they are.
    ncu-shared|ncu-groups) shape=""; [ "$1" = ncu-groups ] && shape="--prefix 512 --groups 4 --doc 4096"
        "$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -n 1)" --clock-control none \
            -k regex:'_partials_kernel|_merge_kernel' --launch-skip 3 --launch-count 9 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
            --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
            --section InstructionStats --section SourceCounters \
            python3 benchmarks/kernel_bench.py $shape --ncu 4 ;;
    fused-tests) python3 -m pytest -q tests/test_fused_qwen3.py ;;
    # The same on a branch under test, its tree unpacked in .branch (git archive BRANCH | tar -x -C .branch)
    branch-fi) (in_branch && PYTHONPATH=/root/site:$PWD python3 -m pytest -q tests/test_gpu_attention.py tests/test_uniform_segments.py) ;;
    branch-kernel) (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/kernel_bench.py --breakdown) ;;
    branch-triton) (in_branch && PYTHONPATH=/root/site:$PWD python3 -m pytest -q tests/test_triton_cascade.py \
                       tests/test_uniform_segments.py) ;;
    branch-tput) mkdir -p "$RUN/branch" && (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/throughput.py \
                     --model ../$M --workloads shared,groups --backends FLASHINFER,CASCADE --log-dir "$RUN/branch") ;;
    branch-sweep) (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/kernel_bench.py --sweep) ;;
    branch-groups) (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/kernel_bench.py --prefix 512 --groups 4 \
                       --doc 4096 --breakdown) ;;
    branch-nosharing) (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/kernel_bench.py --prefix 0 --own 4352; \
                       PYTHONPATH=/root/site:$PWD python3 benchmarks/kernel_bench.py --batch 1 --prefix 0 --own 640) ;;
    branch-chunks) mkdir -p "$RUN/branch" && (in_branch && PYTHONPATH=/root/site:$PWD python3 benchmarks/chunks_bench.py --model ../$M \
                       --backends FLASHINFER,CASCADE --log-dir "$RUN/branch") ;;
    *) echo "unknown step $1"; return 2 ;;
    esac
}
case "${1:-}" in
start)
    shift
    steps="${*:-throughput gpu-check gpu-tests kernel-bench}"
    mkdir -p "$RUN"
    export RUN
    # A step that hangs (a stuck engine start) is killed after its own SECONDS or STEP_TIMEOUT_S (rc 124), not the queue.
    setsid nohup bash -c '
        source benchmarks/device_env.sh
        for item in '"$steps"'; do
            name=${item%%:*}; limit=${item#"$name"}; limit=${limit#:}
            echo "$(date +%T) start $name" >> "$RUN/progress"
            timeout -k 10 "${limit:-${STEP_TIMEOUT_S:-900}}" bash benchmarks/device_session.sh step "$name" \
                > "$RUN/$name.log" 2>&1; rc=$?
            echo "$(date +%T) end $name rc=$rc" >> "$RUN/progress"
        done
        echo "$(date +%T) all done" >> "$RUN/progress"
    ' > "$RUN/session.log" 2>&1 < /dev/null &
    echo "started in the background: $steps; poll with: bash benchmarks/device_session.sh poll"
    ;;
step)  # one step in the foreground (what start runs for each)
    run_step "$2"
    ;;
poll)
    cat "$RUN/progress" 2>/dev/null || echo "nothing started"
    for log in "$RUN"/*.log; do
        [ -f "$log" ] || continue
        echo "== $(basename "$log"): $(tail -n 1 "$log" | cut -c1-200)"
    done
    # What comes back: the step logs, the profiles, model-check's and gpu_check's outputs (tokens and
    # logprobs per run), then the tails of the per-backend engine logs.
    if [ -n "${OUT:-}" ]; then
        for f in "$RUN"/progress "$RUN"/*.log "$RUN"/profile-*.txt "$RUN"/model-check-*.json "$RUN"/check-*.json; do
            case "$(basename "$f")" in
            check-*.json|model-bench*.log|model-check.log|model-check-unit.log|chunks-bench.log|chunks-profile.log|chunks-fi.log|profile-ceiling.log) ;;  # step logs named like engine logs
            tput-*|check-*|profile-*.log|model-*.log|chunks-*) continue ;;
            esac
            [ -f "$f" ] && cp "$f" "$OUT/"
        done
        for log in "$RUN"/tput-*.log "$RUN"/check-*.log "$RUN"/profile-*.log "$RUN"/model-*.log "$RUN"/chunks-*.log; do
            [ -f "$log" ] && { echo "=== $(basename "$log")"; tail -n 60 "$log"; }
        done > "$OUT/engine-tails.txt" 2>/dev/null
    fi
    ;;
*)
    echo "usage: bash benchmarks/device_session.sh start [STEP...] | poll" >&2
    exit 2
    ;;
esac

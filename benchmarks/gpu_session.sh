#!/usr/bin/env bash
# Every GPU figure from one session, run from the repository root with OUT set to the folder that comes back:
#
#     bash benchmarks/gpu_session.sh quick                      # issue 15: ONE command, at most ~540 s (QUICK_LIMIT_S)
#     bash benchmarks/gpu_session.sh parity|ops|matrix|loss|all # issue 7's stages, each meant for one 10-minute command
#
#   quick   in this order, each step under its own time limit, results written as they come:
#           1 GPU parity of the Triton kernels at bf16, fp16 and fp8 e4m3 (sm_89+): GESSO_KERNELS=triton pytest tests/kernels
#           2 full SDXL 1024 px, batch 1, rank 16, kohya's 722 modules: engine kernels and engine reference (bf16 + ckpt,
#             fp8 + ckpt), diffusers + PEFT (bf16 + ckpt), block swap (where `cli.py bench --blocks-to-swap` exists),
#             the kernels with a CUDA graph; median of 10 steps after 3 warm-up; MFU against the bf16 matmul rate
#             measured first; the memory predictor's peaks computed beside, on the CPU, in the background
#           3 a 50-step loss check, kernels vs reference, bf16 + ckpt
#           then the dispatch table (kernels/dispatch_table.json: the faster path per op shape on this GPU), and if
#           time is left 4: batch 4 and 512 px; last the summary table (python -m benchmarks.summary).
#           Files in $OUT (7 of the 8 that come back): env.log, quick.log, quick-raw.json (rows as measured),
#           predictions.json, blockswap.json, dispatch_table.json, quick.json (rows + predictions + ratios).
#   parity  GPU parity of the Triton kernels:    GESSO_KERNELS=triton python -m pytest -q tests/kernels
#   ops     kernel benchmarks, one file a run:   python -m benchmarks.run -k bench_<op>  (attention, lora_linear, adamw8bit, step)
#   matrix  end-to-end step grid:                python cli.py bench --matrix  (full SDXL, 1024/512 x batch 1/4 x rank 16/64, memory modes)
#   loss    loss check, bf16 and fp8 base:       python cli.py bench --loss-check 50 --gradient-checkpointing  (SDXL 1024, b1, r16)
#   all     the four in order, each with its own budget (only where one command may run ~40 minutes)
#
# The peer needs diffusers, which the GPU machine lacks and cannot download. Its wheels travel in the ignored folder
# .whl/ (see benchmarks/README.md for the download command) and are installed offline first, by this script:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site:$PYTHONPATH
# For the device tool: carry [".whl"] and run `bash benchmarks/gpu_session.sh quick` with timeout_s 600.
#
# Sizing, estimated and not measured: a full SDXL LoRA step at 1024 px with checkpointing is ~21 TFLOP per image,
# ~0.07 s at 30% of an H100's bf16 peak, so 13 steps a system are seconds; model builds, Triton compilation and
# autotuning (cached on disk between the steps) dominate. QUICK_PLAN=1 prints each step and its limit, runs nothing.
set -u -o pipefail

: "${OUT:?set OUT to the folder where logs and results go}"
STAGE=${1:-all}
BUDGET=${STAGE_LIMIT_S:-560}
PY=${PYTHON:-python3}  # the GPU machine's python3 holds torch; it may have no `python`
SITE=${PEER_SITE:-/tmp/site}  # where the carried wheels are installed
mkdir -p "$OUT" benchmarks/results
failed=0

run() {  # run LOG CMD...: one step, logged, stopped at the end of the stage's budget; a failure is remembered
    local log=$OUT/$1.log rc left
    shift
    left=$((BUDGET - (SECONDS - STAGE_START)))
    if [ "$left" -lt 15 ]; then
        echo "! skipped, stage budget spent: $*" | tee -a "$log"
        failed=1
        return
    fi
    echo "+ $*   (at most ${left} s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$left" "$@" 2>&1 | tee -a "$log"
    rc=$?
    echo "= exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=1
}

keep() {  # keep FILE: copy a results file into $OUT
    if [ -f "$1" ]; then cp "$1" "$OUT/"; else echo "! no $1" | tee -a "$OUT/results.log"; fi
}

environment() {
    {
        date -u +"%F %T UTC"
        git rev-parse HEAD && git status --short
        nvidia-smi || echo "! no nvidia-smi"
        "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "pytest", "pytest_benchmark", "diffusers", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "MISSING")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
else:
    print("! no CUDA GPU: every number from this session is a CPU smoke-test number")
EOF
    } 2>&1 | tee -a "$OUT/env.log"
}

# `gesso` importable without installing anything on the GPU machine: a link named gesso to this checkout
GESSO_LINK=$(mktemp -d)
ln -s "$PWD" "$GESSO_LINK/gesso"
export PYTHONPATH="$GESSO_LINK${PYTHONPATH:+:$PYTHONPATH}"

SLUG=$("$PY" -c "from benchmarks.harness import device_slug; print(device_slug())")
DATE=$("$PY" -c "import datetime; print(datetime.date.today().isoformat())")

parity() {
    run parity env GESSO_KERNELS=triton "$PY" -m pytest -q tests/kernels
}

ops() {
    local results=benchmarks/results/$SLUG-$DATE.json  # every run writes this name: copy it before the next
    for op in attention lora_linear adamw8bit step; do
        touch "$OUT/.before-$op"
        run ops "$PY" -m benchmarks.run -k "bench_$op"
        if [ "$results" -nt "$OUT/.before-$op" ]; then cp "$results" "$OUT/$SLUG-$DATE-ops-$op.json"; else echo "! no results from bench_$op" | tee -a "$OUT/ops.log"; fi
        rm -f "$OUT/.before-$op"
    done
}

matrix() {
    run matrix "$PY" cli.py bench --matrix --warmup 3 --steps 10 --out "benchmarks/results/$SLUG-$DATE-step.json"
    keep "benchmarks/results/$SLUG-$DATE-step.json"
}

loss() {
    run loss "$PY" cli.py bench --loss-check 50 --gradient-checkpointing --out "benchmarks/results/$SLUG-$DATE-loss.json"
    keep "benchmarks/results/$SLUG-$DATE-loss.json"
}

quick_step() {  # quick_step LIMIT CMD...: one step of the quick stage, under min(LIMIT, what the stage has left)
    local limit=$1 left rc start elapsed=$SECONDS
    shift
    # from the script's start (SECONDS): the wheel install and the environment count against the whole command's limit;
    # a plan counts none of its own seconds, which are those of the machine printing it (a loaded CPU's imports took
    # 55 s there and squeezed the dispatch-table step out of the plan), not the GPU run's
    [ "${QUICK_PLAN:-0}" = 1 ] && elapsed=0
    left=$((QUICK_LIMIT - elapsed - PLANNED - SUMMARY_RESERVE))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "! skipped, quick budget spent: $*" | tee -a "$OUT/quick.log"
        return
    fi
    if [ "${QUICK_PLAN:-0}" = 1 ]; then  # the plan: each step as if it used its whole limit
        echo "plan ${limit} s: $*"
        PLANNED=$((PLANNED + limit))
        return
    fi
    echo "+ $*   (at most ${limit} s)" | tee -a "$OUT/quick.log"
    start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/quick.log"
    rc=$?
    echo "= exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/quick.log"
    [ "$rc" -eq 0 ] || failed=1
}

quick() {
    QUICK_LIMIT=${QUICK_LIMIT_S:-540}
    SUMMARY_RESERVE=40
    PLANNED=0
    local raw=$OUT/quick-raw.json q="$PY -m benchmarks.quick" pid=""
    local rows="$q rows --results $raw --steps 10 --warmup 3"
    if [ "${QUICK_PLAN:-0}" != 1 ]; then  # the memory predictor needs no GPU: its CPU run overlaps the GPU steps
        (for more in "" "--batch 4 --modes bf16-ckpt" "--resolution 512 --modes bf16-ckpt"; do
            timeout 400 $q predict --out "$OUT/predictions.json" $more 2>&1 | sed 's/^/[predict] /' >> "$OUT/quick.log"
        done) &
        pid=$!
    fi
    local workers=""  # Triton compiles on the CPU, one kernel variant at a time: spread the parity tests over 6 processes
    "$PY" -c "import xdist" 2>/dev/null && workers="-n 6"
    quick_step 90 env GESSO_KERNELS=triton "$PY" -m pytest -q -p no:cacheprovider $workers tests/kernels
    quick_step 130 $rows --systems engine --modes bf16-ckpt  # the first SDXL step compiles and autotunes the kernels
    quick_step 60 $rows --systems engine --modes fp8-ckpt
    quick_step 45 $rows --systems peer --modes bf16-ckpt
    if "$PY" cli.py bench --help 2>/dev/null | grep -q -- --blocks-to-swap; then
        quick_step 35 "$PY" cli.py bench --gradient-checkpointing --blocks-to-swap "${BLOCKS_TO_SWAP:-8}" --steps 10 \
            --warmup 3 --out "$OUT/blockswap.json"
    else
        echo "! cli.py bench has no --blocks-to-swap: no block-swap rows" | tee -a "$OUT/quick.log"
    fi
    # checkpointing saves RNG states in the forward, which capture may refuse: then its row records why, and the
    # second mode (no checkpointing) still gives the graph's speed-up over the eager step of the same model
    quick_step 40 $rows --systems graph --modes bf16-ckpt,bf16
    quick_step 55 $q loss --results "$raw" --steps 50
    quick_step 30 "$PY" -m benchmarks.dispatch_table --budget-s 20 --out "$OUT/dispatch_table.json"
    quick_step 600 $rows --systems engine,peer --modes bf16-ckpt --batch 4
    quick_step 600 $rows --systems engine,peer --modes bf16-ckpt --resolution 512
    while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ $((QUICK_LIMIT - SECONDS)) -gt 40 ]; do
        sleep 1  # the predictions, for as long as the budget allows; the summary takes what is there
    done
    SUMMARY_RESERVE=0
    quick_step 40 "$PY" -m benchmarks.summary --results "$raw" --predictions "$OUT/predictions.json" --extra "swap${BLOCKS_TO_SWAP:-8}=$OUT/blockswap.json" \
        --out "$OUT/quick.json"
    [ -f "$OUT/quick.json" ] && cp "$OUT/quick.json" "benchmarks/results/$SLUG-$DATE-quick.json"
    return 0
}

case "$STAGE" in
    parity | ops | matrix | loss | quick) stages=$STAGE ;;
    all) stages="parity ops matrix loss" ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_session.sh quick|parity|ops|matrix|loss|all" >&2; exit 2 ;;
esac
if [ "${QUICK_PLAN:-0}" != 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then  # the peer's diffusers, carried as wheels: installed offline
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || echo "! wheel install failed" | tee -a "$OUT/env.log"
    fi
    environment
fi
for stage in $stages; do
    STAGE_START=$SECONDS
    "$stage"
done
echo "stages: $stages; $([ "$failed" -eq 0 ] && echo "all steps passed" || echo "SOME STEP FAILED, see $OUT/*.log")"
exit "$failed"

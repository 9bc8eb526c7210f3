#!/usr/bin/env bash
# What issue 7 needs from one GPU session, run from the repository root with OUT set to the folder that comes back:
#
#     bash benchmarks/gpu_session.sh parity|ops|matrix|loss|all
#
#   parity  GPU parity of the Triton kernels:    GESSO_KERNELS=triton python -m pytest -q tests/kernels
#   ops     kernel benchmarks, one file a run:   python -m benchmarks.run -k bench_<op>  (attention, lora_linear, adamw8bit, step)
#   matrix  end-to-end step grid:                python cli.py bench --matrix  (full SDXL, 1024/512 x batch 1/4 x rank 16/64, memory modes)
#   loss    loss check, bf16 and fp8 base:       python cli.py bench --loss-check 50 --gradient-checkpointing  (SDXL 1024, b1, r16)
#   all     the four in order, each with its own budget (only where one command may run ~40 minutes)
#
# Each stage is meant to fit one 10-minute command: its steps share a budget of STAGE_LIMIT_S seconds (default 560)
# and a step still running when the budget ends is stopped, keeping its log and, for matrix and loss, the rows written
# so far (cli.py bench saves after every case). Sizing, estimated and not measured: a full SDXL LoRA step at 1024 px
# with checkpointing is ~21 TFLOP per image, ~0.07 s at 30% of an H100's bf16 peak, so the matrix's 20 rows of
# 3 warm-up and 10 timed steps (plus one counted reference step per case) are ~2 minutes of steps; model builds and
# Triton autotuning come on top. Every step logs to $OUT/<stage>.log; results JSON are copied into $OUT.
set -u -o pipefail

: "${OUT:?set OUT to the folder where logs and results go}"
STAGE=${1:-all}
BUDGET=${STAGE_LIMIT_S:-560}
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
        python - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "pytest", "pytest_benchmark"):
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

SLUG=$(python -c "from benchmarks.harness import device_slug; print(device_slug())")
DATE=$(python -c "import datetime; print(datetime.date.today().isoformat())")

parity() {
    run parity env GESSO_KERNELS=triton python -m pytest -q tests/kernels
}

ops() {
    local results=benchmarks/results/$SLUG-$DATE.json  # every run writes this name: copy it before the next
    for op in attention lora_linear adamw8bit step; do
        touch "$OUT/.before-$op"
        run ops python -m benchmarks.run -k "bench_$op"
        if [ "$results" -nt "$OUT/.before-$op" ]; then cp "$results" "$OUT/$SLUG-$DATE-ops-$op.json"; else echo "! no results from bench_$op" | tee -a "$OUT/ops.log"; fi
        rm -f "$OUT/.before-$op"
    done
}

matrix() {
    run matrix python cli.py bench --matrix --warmup 3 --steps 10 --out "benchmarks/results/$SLUG-$DATE-step.json"
    keep "benchmarks/results/$SLUG-$DATE-step.json"
}

loss() {
    run loss python cli.py bench --loss-check 50 --gradient-checkpointing --out "benchmarks/results/$SLUG-$DATE-loss.json"
    keep "benchmarks/results/$SLUG-$DATE-loss.json"
}

case "$STAGE" in
    parity | ops | matrix | loss) stages=$STAGE ;;
    all) stages="parity ops matrix loss" ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_session.sh parity|ops|matrix|loss|all" >&2; exit 2 ;;
esac
environment
for stage in $stages; do
    STAGE_START=$SECONDS
    "$stage"
done
echo "stages: $stages; $([ "$failed" -eq 0 ] && echo "all steps passed" || echo "SOME STEP FAILED, see $OUT/*.log")"
exit "$failed"

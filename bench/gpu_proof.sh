#!/usr/bin/env bash
# GPU proof in two calls of the device tool: install, the kernel tests (under the device Triton's
# interpreter), `grokfast check` at the presets' shapes, determinism, a full nanda run on the fused backend
# with Grokfast-EMA, the benchmark report in parts, and the sweep throughput. Every stage has its own time
# limit and the script goes on after a failure, so a call returns everything that could be measured.
# Output: $OUT/gpu_proof.tar.gz (all logs and reports) and $OUT/summary.txt; unpack under
# bench/results/<date>-<device>/ and commit.
#
# Two calls cover everything (each stage has its own limit; a call may run 600 s):
#   run(command="bash bench/gpu_proof.sh", timeout_s=600)                      # stages of call 1 (default)
#   run(command="GPU_PROOF_STAGES='bench-compile bench-grok bench-scaling' bash bench/gpu_proof.sh", timeout_s=600)
# and, to decide whether the tensor-core tf32x3 dots can become the default (they must meet the float32
# bounds of `grokfast check`), a third:
#   run(command="GPU_PROOF_STAGES='check-tf32x3 bench-tf32x3 bench-ungrouped' bash bench/gpu_proof.sh", timeout_s=600)
# (bench-ungrouped: the step with every product in its own launch, GROKFAST_GEMM_GROUP=1, against bench-step)
set -u
OUT=${OUT:-$(mktemp -d)}
R="$OUT/gpu_proof"
mkdir -p "$R"
export PYTHONUNBUFFERED=1
STAGES=${GPU_PROOF_STAGES:-"tests check determinism train bench-step sweep"}

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $R/NAME.log, note the outcome
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$R/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s): $*" | tee -a "$R/summary.txt"
}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) uncommitted files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
EOF
} >"$R/summary.txt" 2>&1

pip install -q --no-deps --no-build-isolation -e . >"$R/install.log" 2>&1 || echo "install failed (see install.log)" >>"$R/summary.txt"

for s in $STAGES; do
    case $s in
        # the kernel tests build CPU tensors: on the device's Triton they run under its interpreter (this
        # checks the kernels against that Triton version); the GPU itself is checked by `grokfast check`
        tests) stage tests 120 env TRITON_INTERPRET=1 python -m pytest -q -x tests/test_kernels_model.py tests/test_kernels_optimizer.py ;;
        check) stage check 110 grokfast check ;;
        determinism) stage determinism 45 python bench/determinism.py ;;
        train) stage train 75 grokfast train --preset nanda --backend fused --grokfast ema --no-progress --out "$R/nanda-ema-fused" ;;
        bench-step) stage bench-step 90 grokfast bench --no-progress --no-grok --no-scaling \
            --backends reference-eager,fused,fused-cudagraph --out "$R/bench-step" ;;
        bench-compile) stage bench-compile 280 grokfast bench --no-progress --no-grok --no-scaling \
            --backends reference-eager,reference-compile-max-autotune,reference-compile-reduce-overhead,fused-cudagraph \
            --out "$R/bench-compile" ;;
        bench-grok) stage bench-grok 200 grokfast bench --no-progress --no-scaling --grok-max-steps 50000 \
            --backends reference-eager,fused-cudagraph --out "$R/bench-grok" ;;
        bench-scaling) stage bench-scaling 100 grokfast bench --no-progress --no-grok \
            --backends reference-eager,fused-cudagraph --out "$R/bench-scaling" ;;
        check-tf32x3) stage check-tf32x3 150 grokfast check --precision tf32x3 ;;
        bench-tf32x3) stage bench-tf32x3 150 grokfast bench --precision tf32x3 --no-progress --no-scaling \
            --grok-max-steps 50000 --backends fused,fused-cudagraph --out "$R/bench-tf32x3" ;;
        bench-ungrouped) stage bench-ungrouped 90 env GROKFAST_GEMM_GROUP=1 grokfast bench --no-progress --no-grok \
            --no-scaling --backends reference-eager,fused,fused-cudagraph --out "$R/bench-ungrouped" ;;
        sweep) stage sweep 80 grokfast bench --sweep-throughput --no-progress --out "$R/sweep-throughput" ;;
        *) echo "unknown stage $s" >>"$R/summary.txt" ;;
    esac
done
rm -rf "$R"/nanda-ema-fused/checkpoints  # weights are not results; keep the metrics and the figure
cp "$R/summary.txt" "$OUT/summary.txt"
tar -czf "$OUT/gpu_proof.tar.gz" -C "$OUT" gpu_proof && rm -rf "$R"
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# GPU proof in one call of the device tool: install, the kernel tests (interpreter, the device's Triton), `grokfast check` at the
# presets' shapes, a full nanda run on the fused backend with Grokfast-EMA, the benchmark report and the
# sweep throughput. Every stage has its own time limit and the script goes on after a failure, so one
# call returns everything that could be measured. Output: $OUT/gpu_proof.tar.gz (all logs and reports)
# and $OUT/summary.txt; unpack under bench/results/<date>-<device>/ and commit.
#
#   run(command="bash bench/gpu_proof.sh", timeout_s=600)          # device tool, repo root
#
# Stage budget (seconds) adds up to under the 600 s a call may run; pass a list to change it:
#   GPU_PROOF_STAGES="tests check determinism train bench sweep" bash bench/gpu_proof.sh
set -u
OUT=${OUT:-$(mktemp -d)}
R="$OUT/gpu_proof"
mkdir -p "$R"
export PYTHONUNBUFFERED=1
STAGES=${GPU_PROOF_STAGES:-"tests check determinism train bench sweep"}

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
        bench) stage bench 150 grokfast bench --no-progress --out "$R/bench" ;;
        sweep) stage sweep 50 grokfast bench --sweep-throughput --no-progress --out "$R/sweep-throughput" ;;
        *) echo "unknown stage $s" >>"$R/summary.txt" ;;
    esac
done
rm -rf "$R"/nanda-ema-fused/checkpoints  # weights are not results; keep the metrics and the figure
cp "$R/summary.txt" "$OUT/summary.txt"
tar -czf "$OUT/gpu_proof.tar.gz" -C "$OUT" gpu_proof && rm -rf "$R"
cat "$OUT/summary.txt"

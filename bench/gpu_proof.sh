#!/usr/bin/env bash
# The GPU proof in ONE call of the device tool, under 8 minutes on an H100 or H200:
#
#   run(command="bash bench/gpu_proof.sh", timeout_s=540)
#
# Stages in priority order, each with its own time limit, each writing its result into $OUT as soon as it
# finishes (at most 8 files), so a run cut off early still returns the first results:
#   1 graph.txt     the step captured as a CUDA graph at the nanda shapes; replay bit-identical to eager
#                   after 200 steps; no descriptor table built after the warm-up      (bench/graph_proof.py)
#   2 check.txt     grokfast check at the presets' real shapes (ieee), then nanda at tf32x3 (EMA), then nanda
#                   with StableMax and the orthogonal gradient (EMA; grokfast compare's fused methods), then the
#                   kernel-path tests on the GPU (LayerNorm at 16384 rows against float64, the split step,
#                   the captured step replaying the eager bits)   (tests/test_kernels_paths.py)
#   3 bench.md      us/step of reference eager, fused eager and fused CUDA graph, side by side, with the
#     bench.json    floor (grokfast bench); then torch.compile max-autotune (appended to bench.md,
#     bench-compile.json)
#   4 profile.txt   the graph-replayed step kernel by kernel (bench/profile_step.py)
#   5 train.txt     a fused nanda run with Grokfast-EMA until 99% test accuracy: its steps and seconds
# plus summary.txt (device, versions, each stage's exit status and seconds). Commit them under
# bench/results/<date>-<device>/ and update README's status table. GPU_PROOF_STAGES picks stages.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1
STAGES=${GPU_PROOF_STAGES:-"graph check bench profile train compile"}
S="$OUT/summary.txt"

stage() {  # stage NAME FILE SECONDS COMMAND...: run with a limit, append its output to $OUT/FILE, note the outcome
    local name=$1 file=$2 limit=$3; shift 3
    local t0=$(date +%s)
    echo "### $name: $*" >>"$OUT/$file"
    timeout "$limit" "$@" >>"$OUT/$file" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s) -> $file" >>"$S"
}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) uncommitted files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    python -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} >"$S"
pip install -q --no-deps --no-build-isolation -e . >"$TMP/install.log" 2>&1 || { echo "install failed:"; tail -5 "$TMP/install.log"; } >>"$S"

for s in $STAGES; do
    case $s in
        graph) stage graph graph.txt 50 python bench/graph_proof.py --preset nanda --steps 200 --grokfast ema ;;
        check)
            stage check check.txt 90 grokfast check
            stage check-tf32x3 check.txt 45 grokfast check --preset nanda --grokfast ema --precision tf32x3
            stage check-methods check.txt 35 grokfast check --preset nanda --grokfast ema --loss stablemax --orthograd
            stage paths check.txt 40 python -m pytest -q -p no:cacheprovider tests/test_kernels_paths.py ;;
        bench)
            stage bench bench.md 70 grokfast bench --no-progress --no-grok --no-scaling \
                --backends reference-eager,fused,fused-cudagraph --out "$TMP/bench"
            [ -f "$TMP/bench/report.md" ] && cat "$TMP/bench/report.md" >>"$OUT/bench.md"
            [ -f "$TMP/bench/report.json" ] && cp "$TMP/bench/report.json" "$OUT/bench.json" ;;
        profile) stage profile profile.txt 30 python bench/profile_step.py --preset nanda --steps 50 ;;
        train)
            stage train train.txt 60 grokfast train --preset nanda --backend fused --grokfast ema --stop-at-grok \
                --no-progress --eval-every 50 --checkpoint-every 100000 --out "$TMP/nanda-ema"
            [ -f "$TMP/nanda-ema/summary.json" ] && cat "$TMP/nanda-ema/summary.json" >>"$OUT/train.txt" ;;
        compile)
            stage compile bench.md 70 grokfast bench --no-progress --no-grok --no-scaling \
                --backends reference-eager,reference-compile-max-autotune,fused-cudagraph --out "$TMP/bench-compile"
            [ -f "$TMP/bench-compile/report.md" ] && cat "$TMP/bench-compile/report.md" >>"$OUT/bench.md"
            [ -f "$TMP/bench-compile/report.json" ] && cp "$TMP/bench-compile/report.json" "$OUT/bench-compile.json" ;;
        *) echo "unknown stage $s" >>"$S" ;;
    esac
done
rm -rf "$TMP"
cat "$S"

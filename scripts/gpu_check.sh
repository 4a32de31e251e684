#!/usr/bin/env bash
# scripts/gpu_check.sh - Arlow's device check, in one bounded run (GPU_CHECK_BUDGET, 480 s by default).
#
#     bash scripts/gpu_check.sh                    # every step on the GPU
#     DEVICE=cpu bash scripts/gpu_check.sh         # rehearsal on the CPU, tiny shapes (224 s on 2 cores; +2 min the
#                                                  # first time DeepSpeed JIT-builds its CPU op)
#     bash scripts/gpu_check.sh attention mfu      # some steps (names: python scripts/gpu_check.py --list)
#
# The steps are in scripts/gpu_check.py (its docstring says what each one checks); this wrapper installs carried
# wheels, runs every step in its own process under a time limit (a hung or crashed step costs only itself), and prints
# the summary. Each step prints "[gpu-check] STEP STATUS - figures" (PASS, FAIL, SKIP). The summary is also written to
# $WORK/summary.txt and, when $OUT names a folder, to $OUT/gpu-check-summary.txt. Exit status 0 if no step FAILed.
#
# Environment (all optional):
#   DEVICE=cuda|cpu      cpu: tiny shapes on the CPU (a rehearsal of every step, no figures that mean anything)
#   PYTHON=python3       the interpreter; its torch is used as it is
#   WHEELHOUSE=DIR       wheels to install first, offline, without dependencies, into a private folder (default: ./.whl
#                        when it exists). A GPU machine without network needs PyAV's wheel there (docs/pretraining.md)
#   GPU_CHECK_BUDGET=480 seconds for the whole run; a step that no longer fits is SKIPped
#   GPU_CHECK_WORK=DIR   scratch folder (default: a new mktemp -d folder); logs of every step are kept there
#   MAE_DEPTH=48         encoder depth of the MFU step (the model card's 48 blocks by default)
#   MFU_TARGET=0.45      the MFU the mfu step must reach on a GPU (issue 16)
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-480}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t arlow-gpu-check.XXXXXX)}
mkdir -p "$WORK"
QUICK=()
[ "$DEVICE" = cpu ] && QUICK=(--quick)
export DEVICE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""
T0=$SECONDS
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"
log() { echo "[gpu-check] $*"; }
left() { echo $((BUDGET - (SECONDS - T0))); }

# Carried wheels go to a private folder first on the path: the machine's own torch/transformers stay untouched.
if [ -z "${WHEELHOUSE:-}" ] && [ -d .whl ]; then WHEELHOUSE=$ROOT/.whl; fi
SITE=""
if [ -n "${WHEELHOUSE:-}" ] && compgen -G "$WHEELHOUSE/*.whl" > /dev/null; then
    SITE=$WORK/site
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELHOUSE"/*.whl > "$WORK/install.log" 2>&1; then
        log "installed into $SITE: $(cd "$WHEELHOUSE" && ls -- *.whl | tr '\n' ' ')"
    else
        log "wheel install FAILED (see $WORK/install.log):"; tail -n 3 "$WORK/install.log"
    fi
fi
# This checkout's arlow, without installing it (no pip install -e needed on a machine without network).
export PYTHONPATH=$ROOT/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}
log "repo $ROOT, $("$PY" --version 2>&1), DEVICE=$DEVICE, budget ${BUDGET}s, work $WORK"

# Most important first: a run cut short by the budget still answers "does it import, is it right, is it fast".
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env attention mfu generate checkpointing compile pretrain fsdp2 ddp zero2)
declare -A LIMIT=([env]=60 [attention]=240 [mfu]=300 [generate]=150 [checkpointing]=120 [compile]=240
                  [pretrain]=240 [fsdp2]=120 [ddp]=120 [zero2]=180)
for step in "${STEPS[@]}"; do
    limit=${LIMIT[$step]:-120}
    avail=$(( $(left) - 5 ))
    if [ "$avail" -lt 20 ]; then
        line=$(printf '%-16s %-4s - %s' "$step" SKIP "out of time budget (GPU_CHECK_BUDGET=$BUDGET)")
        echo "[gpu-check] $line"; echo "$line" >> "$SUMMARY"; continue
    fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    log "-- $step (limit ${limit}s)"
    steplog=$WORK/$step.log
    timeout -k 5 "$limit" "$PY" scripts/gpu_check.py --device "$DEVICE" "${QUICK[@]}" --work "$WORK" "$step" \
        > "$steplog" 2>&1
    rc=$?
    grep '^\[gpu-check\]' "$steplog"
    results=$(grep -E '^\[gpu-check\] [a-z0-9-]+ +(PASS|FAIL|SKIP) - ' "$steplog" | sed 's/^\[gpu-check\] //')
    [ -n "$results" ] && echo "$results" >> "$SUMMARY"
    if [ "$rc" -ge 124 ] || { [ "$rc" -ne 0 ] && ! grep -q ' FAIL - ' <<< "$results"; }; then
        why="exit $rc"; [ "$rc" -ge 124 ] && why="timed out after ${limit}s"
        line=$(printf '%-16s %-4s - %s' "$step" FAIL "$why; last lines of $steplog:")
        echo "[gpu-check] $line"; echo "$line" >> "$SUMMARY"
        grep -v '^\[gpu-check\]' "$steplog" | tail -n 6 | sed 's/^/[gpu-check]     /'
    fi
done

echo
log "summary ($((SECONDS - T0))s; logs in $WORK):"
sed 's/^/[gpu-check]   /' "$SUMMARY"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$SUMMARY" "$OUT/gpu-check-summary.txt"; fi
! grep -q ' FAIL - ' "$SUMMARY"

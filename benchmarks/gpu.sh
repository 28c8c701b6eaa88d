#!/usr/bin/env bash
# The GPU benchmark: every stage of the speed benchmark on one GPU, in about 9 minutes on an H200.
#
#   bash benchmarks/gpu_prepare.sh          # once, with network: wheels + Fashion-MNIST in benchmarks/carry
#   bash benchmarks/gpu.sh [OUT]            # on the GPU machine: writes OUT/gpu.json and OUT/gpu.md
#   bash benchmarks/gpu.sh --dry-run [OUT]  # anywhere: JAX_PLATFORMS=cpu, tiny shapes, < 3 min
#
# OUT defaults to $OUT, else runs/gpu. Each stage runs under its own time limit and a failed
# stage is recorded, not fatal: one run gives every figure it can. Stages: a GPU test subset;
# images (conv 5-k sweep vmapped and looped, the original PyTorch loop on the same device, the
# MLP sweep); SAEs at d 768 and 4096 in float32 and bfloat16 against sparsify with its Triton
# kernels, beside the matmul floor; one step of the 1M-latent SAE; live training from a GPT-2
# with the LM in JAX and in torch on the GPU (JAX held to half the memory), with the DLPack
# hand-off timed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-runs/gpu}}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/stages.jsonl"
CARRY=benchmarks/carry

if [[ -d $CARRY/wheels ]] && ! python -c "import sparsify" 2>/dev/null; then
  pip install -q --no-index --find-links $CARRY/wheels eai-sparsify 2>/dev/null \
    || pip install -q --no-index --no-deps $CARRY/wheels/*.whl
fi
if (( DRY )); then
  export JAX_PLATFORMS=cpu
  QUICK=(--quick) TORCH=(--no-torch) TESTS=(tests/test_topk.py -k ties)
else
  QUICK=() TORCH=(--torch-device cuda) TESTS=(tests/test_topk.py tests/test_sparse_ops.py tests/test_conv.py)
fi
IDX=()
if [[ -d $CARRY/fashion ]]; then IDX=(--idx-dir $CARRY/fashion); fi

stage() {  # stage NAME SECONDS COMMAND...: its log in OUT/NAME.log, its status in stages.jsonl
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" \
    >> "$OUT_DIR/stages.jsonl"
  tail -n 2 "$OUT_DIR/$name.log"
}

stage tests 150 python -m pytest -q -n 0 -p no:randomly -p no:cacheprovider "${TESTS[@]}"
stage images 170 python -m benchmarks.speed --suite images "${QUICK[@]}" "${IDX[@]}" \
  "${TORCH[@]}" --out "$OUT_DIR/images"
stage sae 170 python -m benchmarks.speed --suite sae "${QUICK[@]}" --sae-shapes gpu \
  --dtypes float32 bfloat16 --sae-steps 30 --out "$OUT_DIR/sae"
stage largest 60 python -m benchmarks.speed --suite largest "${QUICK[@]}" \
  --dtypes bfloat16 --out "$OUT_DIR/largest"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 stage live 240 python -m benchmarks.live_gpu \
  --out "$OUT_DIR/live" $( (( DRY )) && echo --dry-run )
python benchmarks/gpu_report.py "$OUT_DIR" $( (( DRY )) && echo --dry-run )

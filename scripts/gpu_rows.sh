#!/usr/bin/env bash
# The GPU speed rows at the paper's scale, on a machine with one CUDA GPU, in under 8
# minutes: `bench speed` for ViT-S/16 with the mask decoder at 768x768 (batch 1 and 8,
# Cityscapes' 19 classes) and at 512x512 with ADE20K's 150 classes (batch 8), every
# method `bench speed` times (decisions forced by the default token schedule), bf16
# eager and bf16 compiled; rows in results/<gpu>/speed.jsonl, then `bench report` into
# reports/<gpu>/. Each step runs under its own `timeout` (the sum is the budget below),
# and a step that fails or runs out of time is logged and the next one still runs.
#
#   scripts/gpu_rows.sh [--dry-run] [--python PY] [--out DIR] [--gpu-name NAME]
#
#   --dry-run        print the commands, run nothing
#   --python PY      the interpreter to run bench with (default: python)
#   --out DIR        copy the rows, the report and the step log there too (e.g. $OUT)
#   --gpu-name NAME  the results/reports folder name (default: the GPU's name, slugged)
#   --only A,B       run only these steps (768-eager, 512-eager, 768-compile, 512-compile, report)
#
# Methods: every one with an inference-time policy (PAUMER, early exit, DToP, ToMe, ALGM at
# its default threshold 0.88, static); the fine-tuned variants run the same code.
# GPU timing settings (docs/speed.md#gpu-rows): 8 timing images (one batch of 8: FLOP
# pricing traces fvcore per token count, so fewer images keep it short), 3 warm-up passes,
# 5 repeats; one schedule (0.75, 0.575, 0.4 +- 0.1), pad and packed; ToMe r = 88 at 768
# and 39 at 512 (FLOPs ratio about 0.67, as PAUMER's); static at scale 0.75.
set -u -o pipefail

PY=python
OUT=""
DRY=0
GPU=""
ONLY=""
usage="usage: scripts/gpu_rows.sh [--dry-run] [--python PY] [--out DIR] [--gpu-name NAME] [--only STEP,...]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --python|--out|--gpu-name|--only)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "Error: $1 expects a value; $usage" >&2; exit 2; fi
      case "$1" in --python) PY="$2" ;; --out) OUT="$2" ;; --gpu-name) GPU="$2" ;; --only) ONLY="$2" ;; esac
      shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "Error: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
if [ -n "$GPU" ] && ! [[ "$GPU" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "Error: --gpu-name '$GPU': expected letters, digits, '.', '_' or '-'" >&2; exit 2
fi
NAMES=" 768-eager 512-eager 768-compile 512-compile report "
for name in ${ONLY//,/ }; do
  if [[ "$NAMES" != *" $name "* ]]; then echo "Error: --only $name: expected steps among$NAMES" >&2; exit 2; fi
done

cd "$(dirname "$0")/.." || exit 2
if [ -z "$GPU" ]; then
  if [ "$DRY" = 1 ]; then
    GPU="gpu"  # a dry run asks nothing of the machine
  else
    GPU=$(timeout 60 "$PY" -c "import torch, re; assert torch.cuda.is_available(), 'no CUDA GPU'
print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))") || {
      echo "Error: no CUDA GPU found by $PY (torch.cuda.is_available() is False); this script times on a GPU" >&2
      exit 2
    }
  fi
fi
RESULTS="results/$GPU"
REPORTS="reports/$GPU"
export BENCH_GIT_COMMIT="${BENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"

COMMON="--model vit_small --decoder mask --device cuda --precision bf16 --threads 4
  --method paumer,early-exit,dtop,tome,algm,static --op algm:threshold=0.88 --batching pad,packed --scale 0.75
  --timing-images 8 --warmup 3 --repeats 5 --results $RESULTS"
AT768="--size 768 --batch-size 1,8 --tome-r 88"
AT512="--size 512 --batch-size 8 --num-classes 150 --tome-r 39"

# name | seconds | command (the budget: 470 s of steps, under 8 minutes in all; compiling
# takes most of the compiled steps: inductor's first graphs, then its cache)
STEPS=(
  "768-eager|110|$PY -m bench.cli speed $COMMON $AT768"
  "512-eager|70|$PY -m bench.cli speed $COMMON $AT512"
  "768-compile|160|$PY -m bench.cli speed $COMMON $AT768 --compile"
  "512-compile|100|$PY -m bench.cli speed $COMMON $AT512 --compile"
  "report|30|$PY -m bench.cli report --results $RESULTS --out $REPORTS"
)

log() { echo "$*"; if [ "$DRY" = 0 ] && [ -n "$OUT" ]; then echo "$*" >> "$OUT/steps.log"; fi; }
if [ "$DRY" = 0 ]; then
  mkdir -p "$RESULTS" || exit 2
  if [ -n "$OUT" ]; then mkdir -p "$OUT" || exit 2; : > "$OUT/steps.log"; fi
fi

failed=0
for step in "${STEPS[@]}"; do
  name="${step%%|*}"; rest="${step#*|}"; seconds="${rest%%|*}"; cmd="${rest#*|}"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  cmd=$(echo $cmd)  # one line
  if [ "$DRY" = 1 ]; then
    echo "timeout $seconds $cmd"
    continue
  fi
  log "== $name (at most ${seconds}s): $cmd"
  start=$(date +%s)
  if [ -n "$OUT" ]; then
    timeout --kill-after=10 "$seconds" $cmd 2>&1 | tee -a "$OUT/steps.log"
    code=${PIPESTATUS[0]}
  else
    timeout --kill-after=10 "$seconds" $cmd
    code=$?
  fi
  log "== $name: exit $code after $(( $(date +%s) - start ))s$([ "$code" = 124 ] && echo ' (timed out)')"
  [ "$code" = 0 ] || failed=$((failed + 1))
done

if [ "$DRY" = 0 ] && [ -n "$OUT" ]; then
  mkdir -p "$OUT/$RESULTS" "$OUT/$REPORTS"
  cp -r "$RESULTS/." "$OUT/$RESULTS/" 2>/dev/null
  cp -r "$REPORTS/." "$OUT/$REPORTS/" 2>/dev/null
  log "copied $RESULTS and $REPORTS to $OUT"
fi
[ "$DRY" = 1 ] || log "done: $failed step(s) failed"
[ "$failed" = 0 ]

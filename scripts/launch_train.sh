# Shared by train_cifar10.sh and train_imagenet.sh (sourced, not run): parses the paper's wrapper flags over the
# defaults the wrapper set, and launches train.py under torchrun. Inputs: the variables NGPUS NOISE BLR BATCH
# ACCUM_ITER LBD EPS NUM_NOISES WEIGHT_DECAY WEIGHT_DECAY_END LAYER_DECAY and the array FIXED (the dataset's fixed
# train.py flags, before the weight-decay ones) and FIXED_TAIL (after them).
RESUME="" RESUME_FLAG=false LOAD_FROM="" EPS_DOUBLE=false WARMUP_EPS=""
EXTRA=()

value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ngpus) value "$@"; NGPUS="$2"; shift 2 ;;
    --noise) value "$@"; NOISE="$2"; shift 2 ;;
    --blr) value "$@"; BLR="$2"; shift 2 ;;
    --batch) value "$@"; BATCH="$2"; shift 2 ;;
    --accum_iter) value "$@"; ACCUM_ITER="$2"; shift 2 ;;
    --lbd) value "$@"; LBD="$2"; shift 2 ;;
    --eps) value "$@"; EPS="$2"; shift 2 ;;
    --num_noises) value "$@"; NUM_NOISES="$2"; shift 2 ;;
    --weight_decay) value "$@"; WEIGHT_DECAY="$2"; shift 2 ;;
    --weight_decay_end) value "$@"; WEIGHT_DECAY_END="$2"; shift 2 ;;
    --layer_decay) value "$@"; LAYER_DECAY="$2"; shift 2 ;;
    --load_from) value "$@"; LOAD_FROM="$2"; shift 2 ;;
    --eps_double) EPS_DOUBLE=true; shift ;;
    --warmup_eps) value "$@"; WARMUP_EPS="$2"; shift 2 ;;
    --resume)
      if [[ $# -ge 2 && "$2" != --* ]]; then RESUME="$2"; shift 2; else RESUME_FLAG=true; shift; fi ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [[ "$RESUME_FLAG" == true && -z "$RESUME" ]]; then
  [[ -n "$LOAD_FROM" ]] || { echo "error: --resume needs a checkpoint (--resume CKPT or --resume --load_from CKPT)" >&2; exit 2; }
  RESUME="$LOAD_FROM" LOAD_FROM=""
fi

PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
if [[ "${NNODES:-1}" == 1 && -z "${MASTER_PORT:-}" ]]; then
  LAUNCH=(--standalone --nproc_per_node "$NGPUS")
else
  LAUNCH=(--nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NGPUS"
          --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
CMD=("$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" train.py "${FIXED[@]}"
  --blr "$BLR" --batch "$BATCH" --accum_iter "$ACCUM_ITER"
  --weight_decay "$WEIGHT_DECAY" --weight_decay_end "$WEIGHT_DECAY_END" --layer_decay "$LAYER_DECAY"
  "${FIXED_TAIL[@]}"
  --train_noise_sd "$NOISE" --test_noise_sd "$NOISE" --num_noises "$NUM_NOISES" --lbd "$LBD"
  --eps "$EPS" --num-steps "$NUM_STEPS" --warm_start true --use_fp16 true)
[[ "$EPS_DOUBLE" == true ]] && CMD+=(--eps_double)
[[ -n "$WARMUP_EPS" ]] && CMD+=(--warmup_eps "$WARMUP_EPS")
[[ -n "$RESUME" ]] && CMD+=(--resume "$RESUME")
[[ -n "$LOAD_FROM" ]] && CMD+=(--load_from "$LOAD_FROM")
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})

echo "==> ${CMD[*]}"
[[ -n "${DRY_RUN:-}" ]] && exit 0
exec "${CMD[@]}"

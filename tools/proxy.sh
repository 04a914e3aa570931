#!/usr/bin/env bash
# The CPU proxies behind the README's ablation tables: a fixed small configuration of train_gpt.py trained on a corpus
# in byte260 shards (README, "CPU proxies", says how to build one), then the full export and evaluation path. Prints
# the final metric lines; the log lands in logs/$RUN_ID.txt.
#
#   tools/proxy.sh short|long|rich CORPUS_DIR [VAR=value ...]          (from the project root)
#
#   short  512-byte windows, MODEL_DIM=128, 400 steps of 16,352 bytes (14-34 min on 2 CPU cores in logs/)
#   long   the same with 2,048-byte windows, where context and attention span matter (~1.5x as long)
#   rich   MODEL_DIM=64 for 2,000 steps: ~82 training bytes per parameter instead of ~5, nearer the real run's ~220;
#          where training dynamics are judged (not timed yet). Give it a corpus of ~46 MB or more.
# Extra VAR=value arguments override the configuration (an ablation knob, SEED, RUN_ID, ...). Compare a change only
# with a baseline run the same way, on the same machine, the same day.
set -euo pipefail
usage="usage: tools/proxy.sh short|long|rich CORPUS_DIR [VAR=value ...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
kind=$1 corpus=$2
shift 2
[ -f train_gpt.py ] || { echo "error: run from the project root (no train_gpt.py here)" >&2; exit 2; }
[ -d "$corpus" ] || { echo "error: CORPUS_DIR=$corpus: no such folder" >&2; exit 2; }
tokenizer="$corpus/tokenizer.json"
[ -f "$tokenizer" ] || tokenizer="$corpus/fineweb_pure_byte_260.json"  # as data/prepare.py --output writes it
export DATA_PATH="$corpus" TOKENIZER_PATH="$tokenizer"
export MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 NUM_LAYERS=2 ENCODER_REPEATS=2 DECODER_LAYERS=2 DECODER_HEADS=4
export LATENT_DIM=64 TRAIN_SEQ_LEN=511 TRAIN_BATCH_TOKENS=16352 VAL_BATCH_SIZE=65408
export ITERATIONS=400 WARMDOWN_ITERS=120 WARMUP_STEPS=0 MUON_MOMENTUM_WARMUP_STEPS=100
export MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 USE_COMPILE=0 DEVICE=cpu
export EMA_DECAY=0.98 TTT_ENABLED=1 TTT_BATCH_SEQS=16 SEED=${SEED:-1337}
export EVAL_MAX_SECONDS=100000  # the proxy measures quality: the eval budget guard must never depend on machine speed
case $kind in
  short) ;;
  long) export TRAIN_SEQ_LEN=2047 TRAIN_BATCH_TOKENS=16376 VAL_BATCH_SIZE=65504 VAL_SLIDING_STRIDE=256 ;;
  rich) export MODEL_DIM=64 NUM_HEADS=2 NUM_KV_HEADS=1 DECODER_HEADS=2 LATENT_DIM=32 ITERATIONS=2000 \
          WARMDOWN_ITERS=600 MUON_MOMENTUM_WARMUP_STEPS=500 TRAIN_LOG_EVERY=250 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
export RUN_ID=${RUN_ID:-proxy_${kind}_$(date +%Y%m%d_%H%M%S)}
for kv in "$@"; do export "$kv"; done
start=$(date +%s)
python3 train_gpt.py > /dev/null
echo "proxy run $RUN_ID finished in $(( $(date +%s) - start )) s; log: logs/$RUN_ID.txt"
grep -E "^(step:[0-9]+/[0-9]+ val_|final_|Serialized model|Total submission size|model_params)" "logs/$RUN_ID.txt" |
  grep -v "_breakdown "  # the per-bucket lines stay in the log

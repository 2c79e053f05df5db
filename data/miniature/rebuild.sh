#!/usr/bin/env bash
# Rebuild the embedded miniature (data/miniature/{sd,clip}) from scratch with the project's code.
#
#   bash data/miniature/rebuild.sh              # one GPU (the shipped weights: one H200, ~9 min)
# (the shipped AE stage 3 ran as a separate call after the others, with pretrain.eval_images=200:
#  it trains the decoder only, so its place before or after the UNet does not change the result)
#   DEVICE=cpu bash data/miniature/rebuild.sh   # same recipe on CPU (hours on 2 cores)
#
# Step counts, batch sizes and time limits come from the environment (defaults below). Each
# stage writes its part into data/miniature and its log/metrics into $RUNS/<stage>. The shipped
# style splits (data/world/style) are kept; base/train and base/test are regenerated.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUNS=${RUNS:-outputs/rebuild}
WORKERS=${WORKERS:-$(nproc)}
if [ "${DEVICE:-gpu}" = gpu ]; then TRAINER="trainer=gpu trainer.precision=32-true"; else TRAINER="trainer=cpu"; fi
AE_STEPS=${AE_STEPS:-4000} AE_TIME=${AE_TIME:-00:00:01:30}
AE2_STEPS=${AE2_STEPS:-1500} AE2_TIME=${AE2_TIME:-00:00:00:40}
DEC_STEPS=${DEC_STEPS:-3000} DEC_TIME=${DEC_TIME:-00:00:01:10}
CLIP_STEPS=${CLIP_STEPS:-2500} CLIP_BATCH=${CLIP_BATCH:-256} CLIP_TIME=${CLIP_TIME:-00:00:01:30}
UNET_STEPS=${UNET_STEPS:-10000} UNET_BATCH=${UNET_BATCH:-128} UNET_TIME=${UNET_TIME:-00:00:03:30}
PATTERNS=${PATTERNS:-30000}
MINI=${MINI:-data/miniature}   # where the parts are written

stage() {   # stage NAME CMD...: run, time, and keep going (the caller checks what was written)
  local name=$1; shift; local t0; t0=$(date +%s)
  echo "=== $name: $*"
  "$@" > "$RUNS/$name.log" 2>&1; local rc=$?
  echo "=== $name: rc=$rc, $(( $(date +%s) - t0 )) s"; tail -n 4 "$RUNS/$name.log"
  return $rc
}
mkdir -p "$RUNS"

[ -n "${SKIP_WORLD:-}" ] || stage world env WORKERS="$WORKERS" python data/make_world.py base/train base/test || exit 1
stage autoencoder python -m miniature experiment=pretrain_autoencoder $TRAINER pretrain.miniature_dir="$MINI" hydra.run.dir="$RUNS/autoencoder" \
  trainer.max_steps="$AE_STEPS" +trainer.max_time="$AE_TIME" pretrain.data.batch_size=64 \
  pretrain.data.world_limit=20000 pretrain.data.patterns="$PATTERNS" pretrain.data.workers="$WORKERS" \
  callbacks.model_checkpoint.every_n_train_steps=100000 &
ae=$!
stage clip python -m miniature experiment=pretrain_clip $TRAINER pretrain.miniature_dir="$MINI" hydra.run.dir="$RUNS/clip" \
  trainer.max_steps="$CLIP_STEPS" +trainer.max_time="$CLIP_TIME" pretrain.data.batch_size="$CLIP_BATCH" \
  'pretrain.data.folders.0.limit=null' callbacks.model_checkpoint.every_n_train_steps=100000 &
clip=$!
wait $ae || exit 1
stage autoencoder_refine python -m miniature experiment=pretrain_autoencoder_refine $TRAINER pretrain.miniature_dir="$MINI" \
  hydra.run.dir="$RUNS/autoencoder_refine" trainer.max_steps="$AE2_STEPS" +trainer.max_time="$AE2_TIME" \
  pretrain.data.batch_size=64 pretrain.data.world_limit=20000 pretrain.data.patterns="$PATTERNS" \
  pretrain.data.workers="$WORKERS" callbacks.model_checkpoint.every_n_train_steps=100000 || exit 1
stage autoencoder_decoder python -m miniature experiment=pretrain_autoencoder_decoder $TRAINER pretrain.miniature_dir="$MINI" \
  hydra.run.dir="$RUNS/autoencoder_decoder" trainer.max_steps="$DEC_STEPS" +trainer.max_time="$DEC_TIME" \
  pretrain.data.batch_size=64 pretrain.data.workers="$WORKERS" callbacks.model_checkpoint.every_n_train_steps=100000 || exit 1
wait $clip || exit 1
stage unet python -m miniature experiment=pretrain_unet $TRAINER pretrain.miniature_dir="$MINI" hydra.run.dir="$RUNS/unet" \
  trainer.max_steps="$UNET_STEPS" +trainer.max_time="$UNET_TIME" pretrain.data.batch_size="$UNET_BATCH" \
  pretrain.data.limit=null callbacks.model_checkpoint.every_n_train_steps=2500 || exit 1
[ -n "${SKIP_CARD:-}" ] || stage card python -m miniature.pretrain.card "$MINI"
# the default job's reference features (Inception + CLIP of the 500 test images), keyed by the new CLIP's
# hash; the job reads the checkout's data/miniature, so only for a rebuild written there
if [ "$MINI" = data/miniature ]; then stage reference_features python -m miniature.reference_features || exit 1; fi

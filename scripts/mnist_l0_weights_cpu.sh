#!/usr/bin/env bash
# CPU stand-ins of the L0 and weight-perturbation MNIST recipes (conf/experiment/mnist_l0.yaml,
# mnist_weights.yaml): a 4000-image subset, batch 64, a few epochs, then verification of the first
# 1000 test images against the run's own threat model (verify.py: clean, the threat's attack,
# IBP / CROWN-IBP / CROWN alone and as a cascade; VERIFY_ARGS adds verify.py options, e.g. eps=1).
#   bash scripts/mnist_l0_weights_cpu.sh l0 [extra train.py overrides ...]        # k = 2 pixels
#   bash scripts/mnist_l0_weights_cpu.sh l0 perturbation.eps=1 perturbation.eval_eps=1   # k = 1
#   bash scripts/mnist_l0_weights_cpu.sh weights
#   VERIFY_ONLY=1 bash scripts/mnist_l0_weights_cpu.sh l0
# MNIST must be under $CERTTRAIN_DATA_DIR/MNIST/raw.  Output: outputs/results/<recipe><TAG>/{train,verify}.
set -euo pipefail
cd "$(dirname "$0")/.."
r="$1"; shift
out="outputs/results/${r}${TAG:-}"
export WANDB_MODE=${WANDB_MODE:-disabled} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
case "$r" in
  l0) stand_in=(optim.lr=1e-3 trainer.max_epochs=4 schedule.start=1 schedule.length=2) ;;
  weights) stand_in=(trainer.max_epochs=5 schedule.start=1 schedule.length=3) ;;
  *) echo "usage: $0 l0|weights [overrides ...]" >&2; exit 2 ;;
esac
if [ -z "${VERIFY_ONLY:-}" ]; then
  $PY train.py experiment=mnist_$r dataset.train_subset=4000 dataset.val_size=500 dataset.batch_size=64 \
    "${stand_in[@]}" 'optim.milestones=[]' torch_threads=${THREADS:-1} test=false dataset.num_workers=0 \
    trainer.enable_progress_bar=false hydra.run.dir="$out/train" "$@"
fi
ckpt=$(ls "$out"/train/checkpoints/best-epoch=*.ckpt 2>/dev/null | tail -1 || true)
ckpt=${ckpt:-$out/train/checkpoints/last.ckpt}
$PY verify.py "ckpt=$ckpt" subset=1000 batch_size=250 "methods=[IBP,CROWN-IBP,CROWN]" alone=true curve=false \
  torch_threads=${THREADS:-1} progress=false device=cpu "out=$out/verify" ${VERIFY_ARGS:-}

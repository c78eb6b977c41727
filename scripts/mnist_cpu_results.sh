#!/usr/bin/env bash
# CPU stand-in for issue 5's MNIST results (no GPU): CNN-7-BN at width 16 (linear 128), 4 epochs
# (ε ramp over epochs 0-2, lr ×0.2 at epoch 3), train ε 0.2 for test ε 0.1, then verify.py on the full
# 10k test set with the cascade IBP → CROWN-IBP → CROWN → α-CROWN (CROWN / α-CROWN capped: see below).
#   bash scripts/mnist_cpu_results.sh METHOD [extra train.py overrides ...]     # train, then verify
#   VERIFY_ONLY=1 bash scripts/mnist_cpu_results.sh METHOD                     # verify an existing run
# METHOD: fast_ibp | crown_ibp | mtl_ibp | sabr | pgd (experiment mnist_<METHOD>_0.1).  MNIST must be
# under $CERTTRAIN_DATA_DIR/MNIST/raw.  Output: outputs/results/<METHOD>_0.1/{train,verify}; then
#   python scripts/results_table.py outputs/results/*_0.1
# The runs of docs/results.md, exactly:
#   bash scripts/mnist_cpu_results.sh fast_ibp
#   bash scripts/mnist_cpu_results.sh mtl_ibp method.alpha=0.5 dataset.train_subset=20000
#   bash scripts/mnist_cpu_results.sh crown_ibp dataset.train_subset=10000 method.init=ibp method.reg_lambda=0.5
set -euo pipefail
cd "$(dirname "$0")/.."
m="$1"; shift
out="outputs/results/${m}_0.1"
export WANDB_MODE=${WANDB_MODE:-disabled} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if [ -z "${VERIFY_ONLY:-}" ]; then
  $PY train.py experiment=mnist_${m}_0.1 model.width=16 model.linear_size=128 \
    trainer.max_epochs=4 schedule.length=2 'optim.milestones=[3]' dataset.num_workers=0 \
    trainer.enable_progress_bar=false test=false hydra.run.dir="$out/train" "$@"
fi
ckpt=$(ls "$out"/train/checkpoints/best-epoch=*.ckpt 2>/dev/null | tail -1 || true)
ckpt=${ckpt:-$out/train/checkpoints/last.ckpt}
# On 2 CPU cores CROWN costs ~1.5 s and α-CROWN ~3 s per sample on this model: the first
# MAX_CROWN / MAX_ALPHA samples that reach those stages are attempted (the rest: "not attempted").
$PY verify.py ckpt="$ckpt" pgd_steps=${PGD_STEPS:-50} pgd_restarts=${PGD_RESTARTS:-1} \
  max_samples.CROWN=${MAX_CROWN:-100} max_samples.alpha-CROWN=${MAX_ALPHA:-50} \
  time_limit.CROWN=600 time_limit.alpha-CROWN=600 \
  method_batch_size.CROWN=25 method_batch_size.alpha-CROWN=25 \
  'curve.eps=[0.02,0.05,0.15,0.2]' curve.pgd_steps=20 \
  torch_threads=${THREADS:-1} progress=false out="$out/verify"

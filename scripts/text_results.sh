#!/usr/bin/env bash
# Certified training against word substitutions on the movie-review sentences (CPU), then verify.py
# per budget 1..6: the runs behind the text section of docs/results.md.
#   bash scripts/text_results.sh transformer        # or lstm; extra arguments go to train.py
# Writes outputs/results/text_<model>/ (checkpoints, metrics) and outputs/results/verify_text_<model>/.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:?usage: text_results.sh transformer|lstm [train.py overrides...]}"
shift
run="outputs/results/text_${model}"
/usr/bin/time -f "train: %e s wall" python train.py "experiment=text_${model}_synonym" trainer.enable_progress_bar=false \
    "hydra.run.dir=${run}" "$@"
ckpt=$(ls "${run}"/checkpoints/best-epoch=*.ckpt | tail -n 1)
/usr/bin/time -f "verify: %e s wall" python verify.py "ckpt=${ckpt}" progress=false "out=outputs/results/verify_text_${model}"

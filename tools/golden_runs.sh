#!/usr/bin/env bash
# Golden runs: outputs that a refactor must leave identical. Phantom target data; fseft adapt with
# lp, spatial-adapter + TI, lora + fine-tuned decoder and bitfit; a tiny two-source fseft pretrain
# with validation; fseft predict with an lp and a LoRA run. About 2 minutes on 2 CPU cores.
#   bash tools/golden_runs.sh /tmp/golden/before      # on the old commit
#   bash tools/golden_runs.sh /tmp/golden/after       # on the new one
#   python tools/compare_outputs.py /tmp/golden/before /tmp/golden/after
set -euo pipefail
OUT=$1; rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT"
export FSEFT_CACHE_DIR=$OUT/cache OMP_NUM_THREADS=1
fseft phantom --out data --cases 4 --domain target --seed 3 > /dev/null
common="--model phantom --data data --structures liver,gallbladder --k 1 --seed 0 --no-progress --n-query 2"
fseft adapt $common --method lp --epochs 3 --out r_lp > log_lp.txt
fseft adapt $common --method spatial-adapter --ti --epochs 3 --out r_sa > log_sa.txt
fseft adapt $common --method lora --decoder fine-tuned --max-steps 4 --epochs 2 --patch-size 64 64 64 --out r_lora > log_lora.txt
fseft adapt $common --method bitfit --max-steps 3 --epochs 1 --patch-size 64 64 64 --out r_bitfit > log_bitfit.txt
fseft phantom --out src --cases 3 --domain source --seed 5 > /dev/null
fseft pretrain --help > /dev/null
fseft phantom --out srcs --partial-sources 2 --cases 2 --seed 5 --no-progress > /dev/null
cat > pre.yaml <<'Y'
datasets:
  - {path: srcs/partial_A, name: partial_A}
  - {path: srcs/partial_B, name: partial_B}
validation: {path: data, every: 1}
model: {arch: swin_unetr, arch_kwargs: {feature_size: 12}, classes: [liver, spleen, pancreas, aorta]}
preprocess: {spacing: [6.0, 6.0, 6.0]}
train: {epochs: 2, volumes_per_epoch: 2, batch_size: 1, patch_size: [64, 32, 32], lr: 1.0e-3, seed: 0, warmup_epochs: 1}
Y
fseft pretrain --config pre.yaml --out pre --no-progress > log_pre.txt
fseft predict --model phantom --adapter r_lp -i data/imagesTr -o pred_lp --statistics --no-progress > log_pred.txt 2>&1
fseft predict --model phantom --adapter r_lora -i data/imagesTr/phantom_000_0000.nii.gz -o pred_lora --no-progress > log_pred2.txt 2>&1


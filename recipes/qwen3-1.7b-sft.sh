#!/usr/bin/env bash
# Masked-diffusion SFT of Qwen3-1.7B on instruction data (the seed's `flex-qwen-1b` SFT recipe, in our form).
# INIT: the diffusion-pretrained checkpoint (weights only: fresh optimizer, schedule and step).
# DATASET: instruction data; FORMAT: alpaca | sharegpt | messages | custom.
set -euo pipefail
: "${INIT:?set INIT to the pretrained checkpoint (e.g. outputs/qwen3-1.7b-pretrain/checkpoints/step-00020000)}"
: "${DATASET:?set DATASET to the instruction data (file, folder, HF dataset name or gs:// path)}"
# Mesh (README "Scaling out"): FSDP over the CHIPS chips of each slice, data parallel over SLICES slices.
CHIPS="${CHIPS:-8}"
SLICES="${SLICES:-1}"
exec python -m train.run \
  training_mode=sft data=sft model=flex-qwen-1b init_from="$INIT" \
  data.dataset_name="$DATASET" data.sft.format="${FORMAT:-alpaca}" data.sft.template=qwen3 \
  data.sft.include_system_prompt=true data.block_size=1024 \
  global_batch_size=64 max_steps=3000 diffusion.full_mask_steps=0 \
  optimizer.type=adamw optimizer.learning_rate=2.0e-5 optimizer.weight_decay=0.0 \
  lr_scheduler.type=cosine lr_scheduler.warmup_steps=100 lr_scheduler.min_lr_ratio=0.0 \
  ici_mesh.fsdp="$CHIPS" dcn_mesh.data="$SLICES" \
  model.remat.activation_checkpoint_layers='[Qwen3DecoderLayer]' model.remat.scan_layers=model.layers \
  logging_steps=10 save_steps=500 eval_steps=500 \
  output_dir="${OUTPUT_DIR:-outputs/qwen3-1.7b-sft}" \
  "$@"

#!/usr/bin/env bash
# Masked-diffusion continued pretraining of Qwen3-1.7B (the seed's `flex-qwen-1b` pretraining recipe, in our form).
# Start from the autoregressive Hugging Face weights (INIT, a local directory or a pallas-dlm checkpoint) and adapt
# them to bidirectional masked diffusion on plain text (DATASET: local files, a HF dataset name, or gs://...).
# Mesh (README "Scaling out"): FSDP over the CHIPS chips of each slice (e.g. 8 on a v5p-16 or v6e-8), data parallel
# over SLICES slices. 256 rows of 2,048 tokens per step, in 4 micro-batches: at 32 rows per chip the layers' saved
# inputs alone take 14 GiB, and in one batch the step needs 21.2 GiB on a v5e chip (15.75 GiB; found by
# `compile_only=v5e:2x4`, see README "Scaling out"); in 4 it needs 13.8 GiB.
set -euo pipefail
: "${DATASET:?set DATASET to the pretraining text (folder, file, HF dataset name or gs:// path)}"
CHIPS="${CHIPS:-8}"
SLICES="${SLICES:-1}"
exec python -m train.run \
  training_mode=pretrain data=pretrain model=flex-qwen-1b \
  ${INIT:+init_from=$INIT} \
  data.dataset_name="$DATASET" data.text_field="${TEXT_FIELD:-text}" data.block_size=2048 \
  global_batch_size=256 gradient_accumulation_steps=4 max_steps=20000 diffusion.full_mask_steps=0 \
  optimizer.type=adafactor optimizer.learning_rate=3.0e-4 optimizer.weight_decay=0.0 \
  lr_scheduler.type=cosine lr_scheduler.warmup_steps=1000 lr_scheduler.min_lr_ratio=0.1 \
  diffusion.loss_norm=maskable diffusion.shift_logits=true \
  ici_mesh.fsdp="$CHIPS" dcn_mesh.data="$SLICES" \
  model.remat.activation_checkpoint_layers='[Qwen3DecoderLayer]' model.remat.scan_layers=model.layers \
  logging_steps=10 save_steps=1000 eval_steps=1000 \
  output_dir="${OUTPUT_DIR:-outputs/qwen3-1.7b-pretrain}" \
  "$@"

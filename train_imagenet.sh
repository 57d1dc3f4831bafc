#!/usr/bin/env bash
# FT-CADIS on ImageNet with the paper's settings (LoRA on ViT-B/16 CLIP @384, METHOD §4).
#
#   ./train_imagenet.sh --ngpus 8 --noise 1.0 [--lbd L] [--eps 64] [--eps_double --warmup_eps 10] [train.py flags ...]
#   ./train_imagenet.sh --ngpus 4 --noise 1.0 --resume runs/.../checkpoint-5.pth.tar
#   ./train_imagenet.sh --ngpus 4 --noise 1.0 --resume --load_from runs/.../checkpoint-5.pth.tar   # the paper's form
#
# --ngpus is the number of processes (GPUs) per node. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and
# MASTER_PORT (torchrun's usual variables) on every node. Any other flag goes to train.py unchanged (e.g.
# --outdir, --data_dir, --classifier_ckpt, --denoiser_ckpt). --weight_decay, --weight_decay_end and --layer_decay
# override the paper's values. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"

# the paper's settings (METHOD §4); each can be overridden by the flag of the same name
NGPUS=4 NOISE=1.0 BLR=4e-4 BATCH=16 ACCUM_ITER=4 LBD=2.0 EPS=64 NUM_NOISES=2 NUM_STEPS=1
WEIGHT_DECAY=0.01 WEIGHT_DECAY_END=0.1 LAYER_DECAY=0.9
FIXED=(--dataset imagenet --arch imagenet_vit_base --ft_method lora --epochs 10 --warmup_epochs 1)
FIXED_TAIL=(--drop_path 0.0 --clip_grad 1.0)
source scripts/launch_train.sh

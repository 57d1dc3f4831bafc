#!/usr/bin/env bash
# FT-CADIS on CIFAR-10 with the paper's settings (full fine-tuning of ViT-B/16 @224, METHOD §4).
#
#   ./train_cifar10.sh --ngpus 4 --noise 1.0 [--lbd L] [--eps 64] [--eps_double --warmup_eps 10] [train.py flags ...]
#   ./train_cifar10.sh --ngpus 4 --noise 1.0 --resume runs/.../checkpoint-5.pth.tar
#   ./train_cifar10.sh --ngpus 4 --noise 1.0 --resume --load_from runs/.../checkpoint-5.pth.tar   # the paper's form
#
# --ngpus is the number of processes (GPUs) per node. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and
# MASTER_PORT (torchrun's usual variables) on every node. Any other flag goes to train.py unchanged (e.g.
# --outdir, --data_dir, --classifier_ckpt, --denoiser_ckpt). --weight_decay, --weight_decay_end and --layer_decay
# override the paper's values. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"

# the paper's settings (METHOD §4); each can be overridden by the flag of the same name
NGPUS=4 NOISE=1.0 BLR=1e-4 BATCH=32 ACCUM_ITER=4 LBD=4.0 EPS=64 NUM_NOISES=4 NUM_STEPS=4
WEIGHT_DECAY=0.04 WEIGHT_DECAY_END=0.4 LAYER_DECAY=0.65
FIXED=(--dataset cifar10 --arch cifar10_vit_base --ft_method full --epochs 30 --warmup_epochs 3)
# the paper's --drop_path 0.2 set its Hugging Face ViT's per-block attention dropout linspace(0, 0.2, 12)[i], not
# stochastic depth: that is --attn_drop_rate 0.2 here (README, "Paper's code vs ours")
FIXED_TAIL=(--attn_drop_rate 0.2 --drop_path 0 --clip_grad 0.3)
source scripts/launch_train.sh

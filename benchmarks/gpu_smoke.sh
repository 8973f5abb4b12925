#!/usr/bin/env bash
# One short CUDA check of the paths CI cannot run: fp16/bf16 networks, nccl, training and resume on a GPU,
# and GPU speed tables. Usage: OUT=/tmp/gpu bash benchmarks/gpu_smoke.sh   (needs one CUDA device)
set -uo pipefail
OUT=${OUT:-/tmp/fdm-gpu-smoke}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_networks.py -k "fp16 or skip_encoder or forward_and_backward" \
    tests/test_distributed.py tests/test_training_stats.py 2>&1 | tail -4
data=datasets/fashion-mnist-32x32-5k.zip
common="--data=$data --arch=ddpmpp --cbase=32 --cres=1,2,2 --batch=128 --tick=6.4 --snap=1 --dump=1 --workers=2 --seed=0 --nosubdir --augment=0"
python train.py --outdir="$OUT/bf16" $common --duration=0.0128 --precision=bf16 --device=cuda 2>&1 | grep -E "^tick|Error|error" | tail -3
torchrun --standalone --nproc_per_node=1 train.py --outdir="$OUT/fp16" $common --duration=0.0064 --fp16=1 2>&1 | grep -E "^tick|Error|error|nccl" | tail -3
torchrun --standalone --nproc_per_node=1 train.py --outdir="$OUT/fp16" $common --duration=0.0128 --fp16=1 --resume="$OUT/fp16" 2>&1 | grep -E "^tick|Error|error" | tail -3
python generate.py --network="$(ls "$OUT"/bf16/network-snapshot-*.pkl | tail -1)" --outdir="$OUT/img" --seeds=0-63 --grid="$OUT/grid.png" 2>&1 | tail -1
python benchmarks/train_speed.py --config=cifar10-ddpmpp --device=cuda --precision=bf16 --steps=3 2>&1 | tail -4
python benchmarks/sample_speed.py --config=cifar10-ddpmpp --device=cuda --batch=256 --out="$OUT/sample_speed.json" 2>&1 | tail -6

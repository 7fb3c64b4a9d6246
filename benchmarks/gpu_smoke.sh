#!/usr/bin/env bash
# The real training and captioning path on a GPU, on the full-size blip2-opt-2.7b architecture with random weights
# (speed and memory are the real model's; captions are not). Run from the repository root on a GPU machine:
#   bash benchmarks/gpu_smoke.sh OUT_DIR
# Writes OUT_DIR/train-b8.json, train-b32.json (results.json of each run: samples/s, peak memory), resume.json,
# captions.jsonl and log.txt.
set -euo pipefail
out=${1:?usage: gpu_smoke.sh OUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
work=${WORK:-/tmp/captune-smoke}
captune() { python3 -m captune.cli "$@"; }
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers',
  transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
python3 benchmarks/random_blip2.py --arch opt-2.7b --output "$work/blip2-opt-2.7b-random"
python3 -c "from pathlib import Path; from captune.data.synthetic import SyntheticSpec, generate_synthetic
generate_synthetic(Path('$work/data'), SyntheticSpec(train=800, val=16, test=16))"
common=(--config configs/blip2-opt-2.7b-flickr8k.yaml "model.name=$work/blip2-opt-2.7b-random" data=synthetic
        "data.data_dir=$work/data" train.validate=false train.warmup_steps=10)
# 1. The shipped Flickr8k recipe's settings (batch 8), 60 steps with a checkpoint at 30; then batch 32.
captune train "${common[@]}" "train.output_dir=$work/b8" train.max_steps=60 train.save_every=30
cp "$work/b8/results.json" "$out/train-b8.json"
captune train "${common[@]}" "train.output_dir=$work/b32" train.batch_size=32 train.max_steps=30
cp "$work/b32/results.json" "$out/train-b32.json"
# 2. Resume the batch-8 run from its step-30 checkpoint and compare the final adapters.
captune train "${common[@]}" "train.output_dir=$work/b8-resumed" train.max_steps=60 train.save_every=30 \
  "train.resume_from=$work/b8/checkpoints/step-000030"
python3 - "$work" "$out/resume.json" <<'PY'
import json, sys
from safetensors.torch import load_file
work, target = sys.argv[1:]
a = load_file(f"{work}/b8/final/adapter_model.safetensors")
b = load_file(f"{work}/b8-resumed/final/adapter_model.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
equal = all((a[k] == b[k]).all().item() for k in a)
json.dump({"tensors": len(a), "bitwise_equal": equal, "max_abs_diff": diff}, open(target, "w"), indent=2)
print("resume: bitwise equal", equal, "max abs diff", diff)
PY
# 3. Caption with the LAVIS protocol (beam 5, 8-30 new tokens), base + adapter on the GPU in bf16.
captune caption "$work"/data/images/test-0000*.png --model-dir "$work/b8/final" --format jsonl \
  --output "$out/captions.jsonl"
nvidia-smi --query-gpu=name,memory.total --format=csv

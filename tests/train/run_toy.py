"""Train ToyLM on a small MQAR task; used by the kill-and-resume and DDP tests as a subprocess.

    python run_toy.py --out result.json [--ckpt DIR --checkpoint-every 1] [--sleep 0.1]
    torchrun --nproc_per_node=2 run_toy.py --out result.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_model import train_toy  # noqa: E402

from hybridattn.train import init_distributed  # noqa: E402
from hybridattn.train.distributed import shutdown  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--ckpt")
parser.add_argument("--checkpoint-every", type=int, default=0)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()

torch.set_num_threads(1)
info = init_distributed()
train_toy(args.out, steps=args.steps, ckpt=args.ckpt, checkpoint_every=args.checkpoint_every, sleep=args.sleep,
          dist=info)
shutdown(info)

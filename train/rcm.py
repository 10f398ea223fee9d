"""rCM / sCM distillation: `accelerate launch train/rcm.py --config configs/digits_rcm.yaml [key=value ...]`."""

from diffdiv.trainers.entry import run
from diffdiv.trainers.rcm import RCMTrainer

if __name__ == "__main__":
    run(RCMTrainer)

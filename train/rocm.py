"""Reward fine-tuning with ROCM.

    accelerate launch train/rocm.py --config configs/<recipe>.yaml [key=value ...]
"""

from diffdiv.trainers.entry import run
from diffdiv.trainers.rocm import ROCMTrainer

if __name__ == "__main__":
    run(ROCMTrainer)

"""Reward fine-tuning with DPOK.

    accelerate launch train/dpok.py --config configs/<recipe>.yaml [key=value ...]
"""

from diffdiv.trainers.dpok import DPOKTrainer
from diffdiv.trainers.entry import run

if __name__ == "__main__":
    run(DPOKTrainer)

"""Reward fine-tuning with DI*.

    accelerate launch train/di_star.py --config configs/<recipe>.yaml [key=value ...]
"""

from diffdiv.trainers.di_star import DIStarTrainer
from diffdiv.trainers.entry import run

if __name__ == "__main__":
    run(DIStarTrainer)

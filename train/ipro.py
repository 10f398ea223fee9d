"""Reward fine-tuning with IPRO.

    accelerate launch train/ipro.py --config configs/<recipe>.yaml [key=value ...]
"""

from diffdiv.trainers.entry import run
from diffdiv.trainers.ipro import IPROTrainer

if __name__ == "__main__":
    run(IPROTrainer)

"""Uni-Instruct.

`accelerate launch train/uni_instruct.py --config configs/digits_uni_instruct_fkl.yaml [key=value ...]`
"""

from diffdiv.trainers.entry import run
from diffdiv.trainers.uni_instruct import UniInstructTrainer

if __name__ == "__main__":
    run(UniInstructTrainer)

"""f-distill: `accelerate launch train/fdistill.py --config configs/toy_fdistill_js.yaml [key=value ...]`."""

from diffdiv.trainers.entry import run
from diffdiv.trainers.fdistill import FDistillTrainer

if __name__ == "__main__":
    run(FDistillTrainer)

"""Train a diffusion teacher: `accelerate launch train/teacher.py --config configs/digits_teacher.yaml`."""

from diffdiv.trainers.entry import run
from diffdiv.trainers.teacher import TeacherTrainer

if __name__ == "__main__":
    run(TeacherTrainer)

"""Evaluation launcher: `accelerate launch sample/eval.py --model DIR --metrics fid --ref digits --out DIR`.

Same arguments as `diffdiv eval` (see diffdiv/eval/job.py); sampling and feature extraction are split
over the launched processes and gathered on the main one.
"""

import sys

from diffdiv.eval.job import main

if __name__ == "__main__":
    sys.exit(main())

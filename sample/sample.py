"""Sampling script (same as `diffdiv sample ...`): `python sample/sample.py --model DIR --steps 1 --out x.npz`."""

import sys

from diffdiv.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))

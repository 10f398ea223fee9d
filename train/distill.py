"""One-step distillation, the trainer chosen by the config's `method` key (fdistill | uni_instruct).

`accelerate launch train/distill.py --config configs/toy_fdistill_js.yaml [key=value ...]`
"""

import sys

from diffdiv.config import ConfigError
from diffdiv.trainers.entry import parse_args, run
from diffdiv.trainers.registry import method_of, trainer_class


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides = parse_args(argv, __doc__)
        cls = trainer_class(method_of(path, overrides, "fdistill", allowed=("fdistill", "uni_instruct")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    run(cls, argv)


if __name__ == "__main__":
    main()

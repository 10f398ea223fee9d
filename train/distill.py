"""One-step distillation, dispatching on the config's `method` key (fdistill | uni_instruct).

`accelerate launch train/distill.py --config configs/toy_fdistill_js.yaml [key=value ...]`
"""

import sys

from diffdiv.config import ConfigError, apply_overrides, read_yaml
from diffdiv.trainers.entry import parse_args, run

METHODS = ("fdistill", "uni_instruct")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides = parse_args(argv, __doc__)
        data = read_yaml(path) if path else {}
        apply_overrides(data, [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") == "method"])
        method = data.get("method", "fdistill")
        if method not in METHODS:
            raise ConfigError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if method == "uni_instruct":
        from diffdiv.trainers.uni_instruct import UniInstructTrainer as cls
    else:
        from diffdiv.trainers.fdistill import FDistillTrainer as cls
    run(cls, argv)


if __name__ == "__main__":
    main()

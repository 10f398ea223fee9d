"""Run several training jobs one after the other in one process group (tests/test_fsdp.py launches this with
`accelerate launch`, so N jobs pay the process start-up once).

    python tests/fsdp_runner.py jobs.json

jobs.json: a list of {"trainer": "module:Class", "config": path, "overrides": [...]}. After each job every rank
writes `<output_dir>/rank<r>.json`: the dtypes of its trained parameters' local shards and the dtypes the first
block of each sharded network computed in (recorded by a forward pre-hook).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch


def run_job(job: dict) -> None:
    from diffdiv.config import load_config
    from diffdiv.trainers import sharding

    mod, cls = job["trainer"].split(":")
    trainer_cls = getattr(importlib.import_module(mod), cls)
    cfg = load_config(trainer_cls.config_cls, job["config"], job["overrides"])
    tr = trainer_cls(cfg)
    tr.setup()
    compute: dict[str, str] = {}
    for name, n in tr.nets.items():
        for root in n.shard_roots:
            units = sharding.block_units(root) or [root]

            def record(m, args, name=name):
                compute.setdefault(name, str(next(m.parameters()).dtype))

            units[0].register_forward_pre_hook(record)
    tr.train()
    info = {"master_dtypes": {name: sorted({str(sharding.local(p).dtype) for p in n.params})
                              for name, n in tr.nets.items()},
            "compute_dtypes": compute, "sharded": tr.sharded}
    (Path(cfg.output_dir) / f"rank{tr.rank}.json").write_text(json.dumps(info))


def main() -> None:
    import faulthandler
    import os

    from diffdiv.trainers.runtime import shutdown

    torch.set_num_threads(1)
    # a collective that one rank never joins hangs: print every thread's stack and exit instead
    faulthandler.dump_traceback_later(float(os.environ.get("FSDP_RUNNER_TIMEOUT", "240")), exit=True)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run_job(job)
    shutdown()


if __name__ == "__main__":
    main()

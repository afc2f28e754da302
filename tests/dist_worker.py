"""Run by tests/test_distributed.py under `python -m paddle.distributed.launch`: one rank of a training run
through tools/train.py, then its per-step losses written to <output_dir>/history.rank<R>.json.
With mp > 1 on CPU it installs the test-only collective stand-in (tests/cpu_collectives.py) first."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import paddle  # noqa: E402

from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.engine.trainer import Trainer  # noqa: E402
from ppvilg.distributed.env import init_parallel  # noqa: E402
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.utils.runtime import setup_from_config  # noqa: E402


def main():
    args = config_parser(__doc__).parse_args()
    cfg = load_or_exit(args)
    setup_from_config(cfg)
    stand_in = cfg.Distributed.mp_degree > 1 and paddle.get_device() == "cpu"
    if stand_in:
        import cpu_collectives
        cpu_collectives.install()
    par = init_parallel(cfg, cpu_collectives_installed=stand_in)
    trainer = Trainer(cfg, build_task(cfg, par))
    trainer.fit()
    with open(os.path.join(cfg.Global.output_dir, f"history.rank{par.rank}.json"), "w") as f:
        json.dump(trainer.history, f)
    # Everything the tests compare is written. Two full CI runs saw a rank end with SIGABRT (the launcher's exit
    # status 250 = -6) during interpreter teardown after a pipeline run had saved its last checkpoint, with no
    # message in either rank's log; it never reproduced alone (4 of 4 runs of that test passed). Leave without
    # the C++ teardown so that the equivalence tests test results, not gloo's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

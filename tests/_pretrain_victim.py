"""``arlow pretrain`` as a script for the exact-resume tests: ``python tests/_pretrain_victim.py [--kill-at N]
OVERRIDES...`` (also under torchrun). With ``--kill-at N`` every process SIGKILLs itself when it is about to start
step N + 1, i.e. after N steps and the checkpoints before them, the way a preempted job dies."""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    from arlow.pretrain.run import load_recipe, pretrain
    from arlow.training import Trainer
    from arlow_cli import release_process_groups

    kill_at = None
    if argv[:1] == ["--kill-at"]:
        kill_at, argv = int(argv[1]), argv[2:]
    if kill_at is not None:
        train_step = Trainer._train_step

        def dying_step(self):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(self)

        Trainer._train_step = dying_step
    pretrain(load_recipe(None, argv))
    release_process_groups()  # as `arlow pretrain` does after a clean finish
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

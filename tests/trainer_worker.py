"""Runs an example training script, optionally dying by SIGKILL in the middle of saving a checkpoint.

    python tests/trainer_worker.py [--crash-during-save STEP] examples/train_contrastive.py CONFIG_OR_FLAGS...

The kill happens after the model and optimizer of checkpoint STEP are written and before its RNG state and trainer
state are: the worst moment for a non-atomic checkpoint.
"""

import importlib.util
import os
import signal
import sys


def main(argv):
    crash_step = None
    if argv[0] == "--crash-during-save":
        crash_step, argv = int(argv[1]), argv[2:]
    script, rest = argv[0], argv[1:]
    spec = importlib.util.spec_from_file_location("example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    if crash_step is not None:
        from trainers.common import ScMMGPTStageTrainer

        original = ScMMGPTStageTrainer._save_rng_state

        def save_rng_state_or_die(self, output_dir):
            if self.state.global_step == crash_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, output_dir)

        ScMMGPTStageTrainer._save_rng_state = save_rng_state_or_die
    example.main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The three stages in a row, each starting from the previous one's saved model, on the embedded PBMC demo.

    python examples/pretrain_all.py --output-dir runs/pbmc                       # tiny configs, minutes on 2 cores
    python examples/pretrain_all.py --output-dir runs/pbmc --override --max_steps 5
    python examples/pretrain_all.py --output-dir runs/paper --config-suffix paper   # paper scale (GPUs, see configs)

Re-running reuses finished stages and resumes an interrupted one from its last complete checkpoint.
"""

import argparse
import os

from trainers.run import STAGES, pretrain_all

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--config-suffix", default="tiny", help="configs/<stage>_<suffix>.yaml")
    parser.add_argument("--model", help="start from this saved scMMGPT instead of the demo model")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[], help="flags passed to every stage")
    args = parser.parse_args(argv)
    stage_argv = {stage: [os.path.join(CONFIGS, f"{stage}_{args.config_suffix}.yaml"), *args.override] for stage in STAGES}
    return pretrain_all(stage_argv, args.output_dir, model=args.model)


if __name__ == "__main__":
    main()

"""The main job on the embedded PBMC data (same as `scmmgpt demo`): train, evaluate, plot. See modeling_scmmgpt/demo.py.

python examples/run_demo.py --output-dir scmmgpt_demo [--fast]
"""

from scmmgpt.demo import main


if __name__ == "__main__":
    main()

"""Main job on the embedded PBMC data: build scMMGPT and run its three tasks (see modeling_scmmgpt/demo.py)."""

from modeling_scmmgpt.demo import main

if __name__ == "__main__":
    main()

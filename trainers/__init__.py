"""Training stages for scMMGPT (contrastive, reconstruction, instruction) on transformers' Trainer and TRL.

Filled by the training issue; kept importable so `pip install scmmgpt` ships the package layout from day one.
"""

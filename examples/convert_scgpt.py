"""Convert a scGPT checkpoint folder (best_model.pt, args.json, vocab.json) into a scMMGPT cell-encoder folder
(safetensors weights, config, gene vocabulary, cell processor).

    python examples/convert_scgpt.py path/to/scGPT_human out/cell_encoder
"""

import argparse
import logging

from modeling_scmmgpt.convert_scgpt import convert_scgpt_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="scGPT folder, or the best_model.pt inside it")
    parser.add_argument("output_dir")
    parser.add_argument("--args-json", help="defaults to args.json next to the checkpoint")
    parser.add_argument("--vocab-json", help="defaults to vocab.json next to the checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor, report = convert_scgpt_checkpoint(
        args.checkpoint, args.args_json, args.vocab_json, output_dir=args.output_dir
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Converted {n_params / 1e6:.1f}M encoder parameters, {len(processor.gene_vocab)} gene tokens -> {args.output_dir}"
    )
    if report.unused:
        print(f"Not part of the encoder (scGPT task heads), left out: {', '.join(report.unused)}")


if __name__ == "__main__":
    main()

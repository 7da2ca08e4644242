"""`pipeline()` tasks for scMMGPT: cell-feature-extraction, cell-type-annotation, cell-description, text-to-cell.

Cell pipelines take AnnData (in memory or backed), a path to an `.h5ad` file (opened backed), or a numpy / scipy
matrix with `gene_names`. They walk the cells in chunks of `batch_size` with a progress bar, so memory is bounded by
the chunk, not the dataset, and can write results back in AnnData convention (`obsm["X_scmmgpt"]`, `obs` columns).
"""

from __future__ import annotations

import difflib
import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTModel
from .prompts import ANNOTATE, DESCRIBE


def _open_cells(inputs):
    """AnnData stays as it is; a path opens backed; arrays pass through."""
    if isinstance(inputs, (str, os.PathLike)):
        import anndata as ad

        if not os.path.isfile(inputs):
            raise FileNotFoundError(f"{inputs}: no such .h5ad file.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(inputs, backed="r")
    return inputs


def _is_anndata(cells) -> bool:
    return hasattr(cells, "obs") and hasattr(cells, "var")


class _NpyRowWriter:
    """Writes a `(n_rows, width)` float32 `.npy` file chunk by chunk with plain file writes (not a memory map, whose
    dirty pages would count against the process), under a temporary name renamed at the end: an interrupted run
    never leaves a file that looks complete."""

    def __init__(self, path: str | os.PathLike, n_rows: int, width: int):
        self.path, self.tmp = str(path), f"{path}.partial"
        self.file = open(self.tmp, "wb")
        header = {"descr": "<f4", "fortran_order": False, "shape": (n_rows, width)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())

    def close(self, complete: bool) -> None:
        self.file.close()
        if complete:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


class _CsvRowWriter(_NpyRowWriter):
    """Rows of a CSV table, written as they come, under a temporary name renamed at the end."""

    def __init__(self, path: str | os.PathLike, header: list[str]):
        import csv

        self.path, self.tmp = str(path), f"{path}.partial"
        self.file = open(self.tmp, "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        self.csv.writerow(header)

    def write(self, rows) -> None:
        self.csv.writerows(rows)


class ScMMGPTCellPipeline(Pipeline):
    """Shared chunked walk over cells. Subclasses define `_forward` and how results are stored."""

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _pipeline_calls_generate = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cell_processor = self.processor.cell_processor

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def preprocess(self, chunk, gene_names=None):
        return self.cell_processor(chunk, gene_names=gene_names)

    def postprocess(self, model_outputs):
        return model_outputs

    def __call__(
        self, inputs, batch_size: int = 64, gene_names=None, write_to_adata: bool = False, progress: bool = True,
        output_file: str | os.PathLike | None = None, **kwargs,
    ):  # fmt: skip
        r"""
        Args:
            inputs: AnnData, a path to an `.h5ad` file, or a `(num_cells, num_genes)` matrix with `gene_names`.
            batch_size (`int`, defaults to 64): cells per forward pass.
            write_to_adata (`bool`): also store the results in the AnnData (in-memory AnnData only).
            output_file (`str`, *optional*): stream the results to this file instead of holding them in memory, so
                memory stays flat for any number of cells: cell-feature-extraction writes a `.npy` file (returned
                memory-mapped), annotation and description a CSV table with one row per cell (its path is
                returned).
        """
        if write_to_adata and output_file is not None:
            raise ValueError("Pass either write_to_adata or output_file: results streamed to a file are not in memory.")
        cells = _open_cells(inputs)
        n_cells = cells.shape[0] if hasattr(cells, "shape") else len(cells)
        self._start(n_cells, **kwargs)
        if output_file is not None:
            self._open_output(output_file, n_cells)
        complete = False
        try:
            with tqdm(total=n_cells, desc=self.task or type(self).__name__, disable=not progress, unit="cell") as bar:
                for start in range(0, n_cells, batch_size):
                    chunk = cells[start : start + batch_size]
                    model_inputs = self.preprocess(chunk, gene_names=gene_names if not _is_anndata(cells) else None)
                    with torch.inference_mode():
                        outputs = self._forward(model_inputs, **kwargs)
                    self._store(start, outputs)
                    bar.update(len(model_inputs["gene_ids"]))
            complete = True
        finally:
            if output_file is not None:
                self._writer.close(complete)
        results = self._finish()
        if write_to_adata:
            if not _is_anndata(cells) or cells.isbacked:
                raise ValueError("write_to_adata needs an in-memory AnnData; read the file without backed mode.")
            self._write(cells, results)
        return results


class CellFeatureExtractionPipeline(ScMMGPTCellPipeline):
    """Cells to L2-normalised scMMGPT embeddings, `(num_cells, projection_dim)`; written to `obsm["X_scmmgpt"]`."""

    def _start(self, n_cells, **kwargs):
        self._features, self._writer = None, None
        self._shape = (n_cells, self.model.config.projection_dim)

    def _open_output(self, path, n_cells):
        if not str(path).endswith(".npy"):
            raise ValueError(f"output_file={path!r}: cell-feature-extraction streams to a .npy file.")
        self._writer = _NpyRowWriter(path, *self._shape)

    def _forward(self, inputs, **kwargs):
        return self.model.get_cell_features(inputs["gene_ids"], inputs["values"], inputs["attention_mask"])

    def _store(self, start, outputs):
        rows = outputs.float().cpu().numpy()
        if self._writer is not None:
            self._writer.write(rows)
            return
        if self._features is None:
            self._features = np.zeros(self._shape, dtype=np.float32)
        self._features[start : start + len(rows)] = rows

    def _finish(self):
        if self._writer is not None:
            return np.load(self._writer.path, mmap_mode="r")
        return self._features

    def _write(self, adata, results):
        adata.obsm["X_scmmgpt"] = results


class CellTypeAnnotationPipeline(ScMMGPTCellPipeline):
    """Cells to the top-k cell types among `candidate_labels`, with scores.

    `mode="zero-shot"` ranks candidates by contrastive similarity between cells and their text (a Cell Ontology id
    or label is described with its definition, so types never seen in training can be named); `mode="generative"`
    lets the LM name the type and maps its answer to the closest candidate.
    """

    def _start(self, n_cells, candidate_labels=None, top_k: int = 1, mode: str = "zero-shot", **kwargs):
        if not candidate_labels:
            raise ValueError("Pass candidate_labels=[...] (Cell Ontology labels or ids, or free text).")
        if mode not in ("zero-shot", "generative"):
            raise ValueError(f"mode={mode!r}: use 'zero-shot' or 'generative'.")
        self._labels, self._top_k, self._mode = list(candidate_labels), min(top_k, len(candidate_labels)), mode
        self._results, self._writer = [], None
        if mode == "zero-shot":
            texts = [self._describe(label) for label in self._labels]
            tokenizer = self.processor.qformer_tokenizer or self.processor.tokenizer
            batch = tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                self._text_features = self.model.get_text_features(batch["input_ids"], batch["attention_mask"])

    @staticmethod
    def _describe(label: str) -> str:
        """`cell type: {label}. {definition}` for Cell Ontology ids or labels, the label alone otherwise."""
        from .ontology import CellOntology

        ontology = CellOntology.load()
        term = label if label in ontology else ontology.resolve(label, None)
        return ontology.describe({"cell_type": label, "cell_type_ontology_term_id": term})

    def _forward(self, inputs, **kwargs):
        if self._mode == "zero-shot":
            cells = self.model.get_cell_features(inputs["gene_ids"], inputs["values"], inputs["attention_mask"])
            scale = getattr(self.model, "model", self.model).cell_tower.logit_scale.exp()
            return (scale * cells @ self._text_features.T).softmax(-1)
        prompt = self.processor.build_prompt(ANNOTATE[0])
        n = inputs["gene_ids"].shape[0]
        text = self.processor(text=[prompt] * n, padding_side="left")
        generated = self.model.generate(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], cell_gene_ids=inputs["gene_ids"],
            cell_values=inputs["values"], cell_attention_mask=inputs["attention_mask"], max_new_tokens=16,
            do_sample=False,
        )  # fmt: skip
        answers = self.processor.batch_decode(generated[:, text["input_ids"].shape[1] :], skip_special_tokens=True)
        scores = torch.tensor([[difflib.SequenceMatcher(None, a.lower().strip(), c.lower()).ratio()
                                for c in self._labels] for a in answers])  # fmt: skip
        return scores

    def _open_output(self, path, n_cells):
        header = ["cell"] + [f"{name}_{k + 1}" for k in range(self._top_k) for name in ("label", "score")]
        self._writer = _CsvRowWriter(path, header)

    def _store(self, start, scores):
        values, indices = scores.float().cpu().topk(self._top_k, dim=-1)
        ranked = [
            [{"label": self._labels[i], "score": v} for v, i in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())
        ]
        if self._writer is None:
            self._results.extend(ranked)
            return
        self._writer.write(
            [start + i] + [x for r in row for x in (r["label"], f"{r['score']:.6g}")] for i, row in enumerate(ranked)
        )

    def _finish(self):
        return self._writer.path if self._writer is not None else self._results

    def _write(self, adata, results):
        adata.obs["scmmgpt_cell_type"] = [r[0]["label"] for r in results]
        adata.obs["scmmgpt_cell_type_score"] = [r[0]["score"] for r in results]


class CellDescriptionPipeline(ScMMGPTCellPipeline):
    """Cells to generated descriptions; written to `obs["scmmgpt_description"]`."""

    _pipeline_calls_generate = True

    def _start(self, n_cells, prompt: str = DESCRIBE[0], max_new_tokens: int = 64, **kwargs):
        self._prompt, self._max_new_tokens, self._texts = self.processor.build_prompt(prompt), max_new_tokens, []
        self._writer = None

    def _open_output(self, path, n_cells):
        self._writer = _CsvRowWriter(path, ["cell", "description"])

    def _forward(self, inputs, **kwargs):
        n = inputs["gene_ids"].shape[0]
        text = self.processor(text=[self._prompt] * n, padding_side="left")
        generated = self.model.generate(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], cell_gene_ids=inputs["gene_ids"],
            cell_values=inputs["values"], cell_attention_mask=inputs["attention_mask"],
            max_new_tokens=self._max_new_tokens, do_sample=False,
        )  # fmt: skip
        return self.processor.batch_decode(generated[:, text["input_ids"].shape[1] :], skip_special_tokens=True)

    def _store(self, start, texts):
        texts = [t.strip() for t in texts]
        if self._writer is None:
            self._texts.extend(texts)
        else:
            self._writer.write([start + i, text] for i, text in enumerate(texts))

    def _finish(self):
        return self._writer.path if self._writer is not None else self._texts

    def _write(self, adata, results):
        adata.obs["scmmgpt_description"] = results


class TextToCellPipeline(Pipeline):
    """Prompts (e.g. "a CD14-positive monocyte from blood") to an AnnData of pseudo-cells over the model's genes.

    Each prompt gives `n_cells` cells: the LM writes up to `max_text_tokens` sampled tokens (seeded) before the cell
    span, so cells differ by seed; with `max_text_tokens=0` the cell follows the prompt directly (one per prompt).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def preprocess(self, inputs):
        return inputs

    def _forward(self, inputs):
        return inputs

    def postprocess(self, outputs):
        return outputs

    def __call__(self, prompts, n_cells: int = 1, seed: int = 0, max_text_tokens: int = 8, genes=None,
                 sample: bool | None = None, temperature: float | None = None):  # fmt: skip
        """`sample`: draw expression from the decoder's per-gene Gaussian; default where the model predicts a
        variance (`config.expression_variance`). `temperature` scales its standard deviation (default
        `config.expression_temperature`)."""
        import anndata as ad
        import pandas as pd

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        vocab = self.processor.cell_processor.gene_vocab
        specials = {vocab.pad_token_id, vocab.cls_token_id, vocab.gene_to_id.get("<eoc>")}
        names = [g for g, i in sorted(vocab.gene_to_id.items(), key=lambda kv: kv[1]) if i not in specials]
        if genes is not None:
            names = list(genes)
        gene_ids = torch.as_tensor(vocab.lookup(names), device=self.device)
        if (gene_ids < 0).any():
            raise ValueError(f"Genes not in the vocabulary: {[n for n, i in zip(names, gene_ids.tolist()) if i < 0][:5]}")
        if sample is None:
            sample = bool(getattr(self.model.config, "expression_variance", False))
        rows, obs = [], []
        for p_idx, prompt in enumerate(prompts):
            text = self.processor.build_prompt(prompt, with_cell=False)
            inputs = self.processor(text=[text], padding_side="left").to(self.device)
            for k in range(n_cells):
                # One seed per cell of the call: cells from different prompts must not share their random draws.
                torch.manual_seed(seed + len(rows))
                out = self.model.generate_cells(
                    inputs["input_ids"], gene_ids, inputs["attention_mask"], max_text_tokens=max_text_tokens,
                    do_sample=max_text_tokens > 0, sample=sample, temperature=temperature,
                )  # fmt: skip
                rows.append(out.expression[0].float().cpu().numpy())
                obs.append({"prompt": prompt, "prompt_index": p_idx, "seed": seed + len(rows) - 1})
        return ad.AnnData(
            np.stack(rows), obs=pd.DataFrame(obs, index=[f"pseudo_cell_{i}" for i in range(len(obs))]),
            var=pd.DataFrame(index=names),
        )  # fmt: skip


def register_pipelines() -> None:
    PIPELINE_REGISTRY.register_pipeline("cell-feature-extraction", CellFeatureExtractionPipeline, pt_model=ScMMGPTModel)
    PIPELINE_REGISTRY.register_pipeline(
        "cell-type-annotation", CellTypeAnnotationPipeline, pt_model=ScMMGPTForConditionalGeneration
    )
    PIPELINE_REGISTRY.register_pipeline("cell-description", CellDescriptionPipeline, pt_model=ScMMGPTForConditionalGeneration)
    PIPELINE_REGISTRY.register_pipeline("text-to-cell", TextToCellPipeline, pt_model=ScMMGPTForConditionalGeneration)


__all__ = [
    "CellDescriptionPipeline",
    "CellFeatureExtractionPipeline",
    "CellTypeAnnotationPipeline",
    "TextToCellPipeline",
    "register_pipelines",
]

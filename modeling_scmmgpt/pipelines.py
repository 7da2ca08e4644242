"""`pipeline()` tasks for scMMGPT: cell-feature-extraction, cell-type-annotation, cell-description, text-to-cell.

Cell pipelines take AnnData (in memory or backed), a path to an `.h5ad` file (opened backed), or a numpy / scipy
matrix with `gene_names`. They walk the cells in chunks of `batch_size` with a progress bar, so memory is bounded by
the chunk, not the dataset, and can write results back in AnnData convention (`obsm["X_scmmgpt"]`, `obs` columns).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import sys
import types
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Pipeline, StoppingCriteria, StoppingCriteriaList
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTModel
from .processing_scmmgpt import cell_inputs
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


def _warn(message: str) -> None:
    """A `UserWarning` that points at the code that called the pipeline, however deep in this module it is raised
    (past torch's and transformers' wrappers too: `no_grad`, the pipeline iterator)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_globals.get("__name__", "").startswith(_WRAPPERS)
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)


_WRAPPERS = ("torch.", "transformers.")


def fit_instruction(processor, instruction: str, context_length: int, new_tokens: int, with_cell: bool = True) -> str:
    """`instruction`, cut at the end (with a warning) so that its chat prompt plus `new_tokens` fits the LM's
    `context_length`: past it, position embeddings the LM never learnt would run silently. An empty instruction
    gets a warning that the output is not conditioned on one."""
    if not instruction.strip():
        _warn("The prompt is empty: the output is not conditioned on any instruction.")
    prompt_length = processor(text=[processor.build_prompt(instruction, with_cell=with_cell)])["input_ids"].shape[1]
    excess = prompt_length + new_tokens - context_length
    if excess <= 0:
        return instruction
    ids = processor.tokenizer(instruction, add_special_tokens=False)["input_ids"]
    if excess >= len(ids):
        raise ValueError(
            f"The LM's context ({context_length} tokens) has no room for the prompt and {new_tokens} new "
            "tokens; ask for fewer new tokens."
        )
    _warn(
        f"The prompt takes {prompt_length} tokens and {new_tokens} more are to be generated, past the LM's "
        f"context of {context_length}: its last {excess} tokens are cut."
    )
    return processor.tokenizer.decode(ids[: len(ids) - excess])


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
        """Publishes the file when `complete`; otherwise removes it, even when closing fails (a full disk fails the
        last flush): an incomplete result never stays, under either name."""
        try:
            self.file.close()
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(self.tmp)
            if complete:  # the last rows never reached the disk
                raise
            return
        if complete:
            os.replace(self.tmp, self.path)
        else:
            with contextlib.suppress(OSError):
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


_CL_ID = re.compile(r"^\s*cl[\s:_-]*(\d{7})\s*$", re.IGNORECASE)


def _candidate_labels(candidate_labels) -> list[str]:
    """The labels to rank: a single string is one label; Cell Ontology ids are written `CL:0000236` whatever their
    case or separator (`cl_0000236`) and must exist; empty labels are refused; repeats are merged, with a warning
    (two copies of a label would split its probability)."""
    from .ontology import CellOntology

    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    normalised = []
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate_labels holds an empty or non-text label ({label!r}); pass names or CL ids.")
        match = _CL_ID.match(label)
        if match:
            label = f"CL:{match.group(1)}"
            if label not in CellOntology.load():
                raise ValueError(
                    f"candidate label {label} is not a Cell Ontology id; check the number, or pass the type's name."
                )
        normalised.append(label.strip())
    unique = list(dict.fromkeys(normalised))
    if len(unique) < len(normalised):
        repeats = sorted({label for label in normalised if normalised.count(label) > 1})
        _warn(f"candidate_labels repeats {repeats}; each is ranked once.")
    return unique


class _LabelChoice(StoppingCriteria):
    """Constrained decoding of a label: after `prompt_length` prompt tokens, a row may only write the tokens of one
    of `sequences` (each label as the LM tokenizes a response) and then `end` (`allowed`, for `generate`'s
    `prefix_allowed_tokens_fn`); as a stopping criterion it ends a row as soon as one label is left, and records it
    in `chosen` (the first, where labels tokenize alike)."""

    def __init__(self, sequences: list[list[int]], end: int, prompt_length: int):
        self.sequences = [list(s) + [end] for s in sequences]
        self.end, self.prompt_length = end, prompt_length
        self.chosen: list[int | None] = []

    def _consistent(self, written: list[int]) -> list[int]:
        return [i for i, s in enumerate(self.sequences) if s[: len(written)] == written]

    def allowed(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        written = input_ids[self.prompt_length :].tolist()
        n = len(written)
        return sorted({self.sequences[i][n] for i in self._consistent(written) if len(self.sequences[i]) > n}) or [
            self.end
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if not self.chosen:
            self.chosen = [None] * input_ids.shape[0]
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if self.chosen[row] is None:
                left = self._consistent(ids)
                if len({tuple(self.sequences[i]) for i in left}) == 1:
                    self.chosen[row] = left[0]
        return torch.tensor([c is not None for c in self.chosen], device=input_ids.device)


# Keywords the base `Pipeline.__init__` takes from its `**kwargs` for itself (besides its named parameters).
_BASE_KEYWORDS = ("args_parser", "torch_dtype", "dtype")


class _ScMMGPTPipeline(Pipeline):
    """What every scMMGPT pipeline shares: it loads the model's `ScMMGPTProcessor` (not a tokenizer or feature
    extractor alone) and checks at construction that the processor's genes are the model's."""

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    # Keywords of the call layer that `pipeline(...)` may set for every call (the base class keeps them).
    _call_keywords: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        # The task's options given to pipeline(...) are kept as given, and each call resolves them together with its
        # own (options depend on each other: the labels and top_k, a prompt and its token budget), so they hold for
        # every call that does not override them. The base class gets only its own keywords.
        kwargs.pop("local_files_only", None)  # the pipeline() factory's loading flag, which it passes on as well
        accepted = set(inspect.signature(self._sanitize_parameters).parameters)
        known = {*accepted, *self._call_keywords, *inspect.signature(Pipeline.__init__).parameters, *_BASE_KEYWORDS}
        if unknown := sorted(set(kwargs) - known):
            options = sorted({*accepted, *self._call_keywords})
            raise ValueError(
                f"{type(self).__name__} has no option {', '.join(unknown)}; its options: {', '.join(options)}."
            )
        self._options = {name: kwargs.pop(name) for name in accepted & kwargs.keys()}
        super().__init__(*args, **kwargs)
        self.processor.check_model_config(self.model.config)  # before any cell is read or written through wrong genes
        with warnings.catch_warnings():  # a bad option fails here, not at the first call; its warnings come with calls
            warnings.simplefilter("ignore")
            self._sanitize_parameters(**self._options)

    def _call_parameters(self, **kwargs) -> tuple[dict, dict, dict]:
        """The (preprocess, forward, postprocess) parameters of one call: its options (those it leaves `None` do not
        count) over those given to `pipeline(...)`, resolved whole by `_sanitize_parameters`."""
        given = {name: value for name, value in kwargs.items() if value is not None}
        return self._sanitize_parameters(**{**self._options, **given})


class ScMMGPTCellPipeline(_ScMMGPTPipeline):
    """Cells to per-cell results, on transformers' `Pipeline` contract.

    The unit the contract processes is a chunk of cells (AnnData rows, or matrix rows with `gene_names`):
    `preprocess` turns it into tensors, `_forward` runs the model (the base class moves the tensors to the pipeline's
    device and back), `postprocess` gives one result per cell. Options travel through `_sanitize_parameters`, never
    through the instance, so calls can interleave. `__call__` is a thin layer over the contract: it walks any number
    of cells in chunks of `batch_size`, streams results to a file or collects them, and writes them into AnnData.
    """

    _pipeline_calls_generate = False
    _call_keywords = ("batch_size",)

    def _sanitize_parameters(self, gene_names=None):
        return {"gene_names": gene_names}, {}, {}

    def preprocess(self, cells, gene_names=None, **kwargs):
        inputs = self.processor.feature_extractor(cells, gene_names=gene_names if not _is_anndata(cells) else None)
        return cell_inputs(inputs)

    def _prompt_inputs(self, instruction: str, n_cells: int) -> dict:
        """A chat prompt holding the cell, once per cell, left-padded for generation."""
        text = self.processor(text=[self.processor.build_prompt(instruction)] * n_cells, padding_side="left")
        return {"input_ids": text["input_ids"], "prompt_attention_mask": text["attention_mask"]}

    def _generate(self, inputs, max_new_tokens: int, labels: _LabelChoice | None = None) -> torch.Tensor:
        """The tokens the LM writes after each cell's prompt, greedily; with `labels`, only a candidate label's
        tokens (transformers' constrained decoding), each row stopping once its label is decided."""
        generated = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["prompt_attention_mask"],
            **cell_inputs(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            prefix_allowed_tokens_fn=labels.allowed if labels is not None else None,
            stopping_criteria=StoppingCriteriaList([labels]) if labels is not None else None,
        )
        return generated[:, inputs["input_ids"].shape[1] :]

    # --- the thin layer: chunks, files, AnnData ------------------------------------------------------------------
    def __call__(
        self,
        inputs,
        batch_size: int | None = None,
        gene_names=None,
        write_to_adata: bool = False,
        progress: bool = True,
        output_file: str | os.PathLike | None = None,
        **kwargs,
    ):
        r"""
        Args:
            inputs: AnnData, a path to an `.h5ad` file, or a `(num_cells, num_genes)` matrix with `gene_names`; or a
                generator of such chunks, which returns the contract's lazy iterator (one list of results per chunk).
            batch_size (`int`, *optional*): cells per forward pass; defaults to the `batch_size` given to
                `pipeline(...)`, else 64.
            write_to_adata (`bool`): also store the results in the AnnData (in-memory AnnData only).
            output_file (`str`, *optional*): stream the results to this file instead of holding them in memory, so
                memory stays flat for any number of cells: cell-feature-extraction writes a `.npy` file (returned
                memory-mapped), annotation and description a CSV table with one row per cell (its path is
                returned).
            kwargs: the task's options (see the subclass).
        """
        # The options are checked and resolved once per call, before any compute or file; the chunks then run
        # through the contract's iterator (preprocess, device placement, _forward, postprocess) with them.
        params = self._call_parameters(gene_names=gene_names, **kwargs)
        if isinstance(inputs, types.GeneratorType):  # chunks of cells: the lazy iterator, one result list per chunk
            return self.get_iterator(inputs, 0, 1, *params)
        if write_to_adata and output_file is not None:
            raise ValueError(
                "Pass either write_to_adata or output_file: results streamed to a file are not in memory."
            )
        batch_size = next(size for size in (batch_size, self._batch_size, 64) if size is not None)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: need at least 1 cell per batch.")
        cells = _open_cells(inputs)
        n_cells = cells.shape[0] if hasattr(cells, "shape") else len(cells)
        if n_cells == 0:  # an empty result would look like a complete one
            raise ValueError("The input has no cells: nothing to compute.")
        chunks = (cells[start : start + batch_size] for start in range(0, n_cells, batch_size))
        writer = self._open_output(output_file, n_cells, params[2]) if output_file is not None else None
        collected, done, complete = [], 0, False
        try:
            with tqdm(total=n_cells, desc=self.task or type(self).__name__, disable=not progress, unit="cell") as bar:
                for chunk_results in self.get_iterator(chunks, 0, 1, *params):
                    if writer is not None:
                        self._write_rows(writer, done, chunk_results)
                    else:
                        collected.extend(chunk_results)
                    done += len(chunk_results)
                    bar.update(len(chunk_results))
            complete = True
        finally:
            if writer is not None:
                writer.close(complete)
        results = self._results(writer.path if writer is not None else None, collected)
        if write_to_adata:
            if not _is_anndata(cells) or cells.isbacked:
                raise ValueError("write_to_adata needs an in-memory AnnData; read the file without backed mode.")
            self._write(cells, results)
        return results

    def _results(self, path, collected):
        return path if path is not None else collected


class CellFeatureExtractionPipeline(ScMMGPTCellPipeline):
    """Cells to L2-normalised scMMGPT embeddings, `(num_cells, projection_dim)`; written to `obsm["X_scmmgpt"]`."""

    def _forward(self, inputs):
        return self.model.get_cell_features(**cell_inputs(inputs))

    def postprocess(self, features):
        return list(features.float().numpy())

    def _open_output(self, path, n_cells, postprocess_params):
        if not str(path).endswith(".npy"):
            raise ValueError(f"output_file={path!r}: cell-feature-extraction streams to a .npy file.")
        return _NpyRowWriter(path, n_cells, self.model.config.projection_dim)

    def _write_rows(self, writer, start, rows):
        writer.write(np.stack(rows))

    def _results(self, path, collected):
        if path is not None:
            return np.load(path, mmap_mode="r")
        width = self.model.config.projection_dim
        return np.stack(collected).astype(np.float32) if collected else np.zeros((0, width), dtype=np.float32)

    def _write(self, adata, results):
        adata.obsm["X_scmmgpt"] = results


class CellTypeAnnotationPipeline(ScMMGPTCellPipeline):
    """Cells to the top-k cell types among `candidate_labels`, with scores.

    `mode="zero-shot"` ranks candidates by contrastive similarity between cells and their text (a Cell Ontology id
    or label is described with its definition, so types never seen in training can be named); `mode="generative"`
    lets the LM name the type, decoding within the candidates' tokens (`constrained=True`, the default: the answer
    is one whole candidate, the LM's own choice) or freely (`constrained=False`: its answer is mapped to the closest
    candidate by string similarity, which reads a cut-short answer such as "CD8+/CD45RA+" by spelling alone).
    Candidates are ranked by string similarity to the answer.

    Open set (zero-shot): a model saved with an open-set reference (`config.open_set_labels`, which the stage
    trainers fit) knows which candidates are types it never trained on. When the candidates mix both, a cell whose
    similarity to the training cells is below `config.open_set_threshold` is taken for a new type and ranked among
    the new candidates only (the trained ones score 0 for it), by CSLS where `config.open_set_hubness_correction` is
    on (the default). `open_set=False` ranks every cell over all candidates.
    """

    def _sanitize_parameters(
        self,
        gene_names=None,
        candidate_labels=None,
        top_k: int = 1,
        mode: str = "zero-shot",
        open_set: bool | None = None,
        constrained: bool = True,
    ):
        if candidate_labels is None:  # pipeline() construction: the labels come with each call
            return {}, {}, {}
        if not candidate_labels:
            raise ValueError("Pass candidate_labels=[...] (Cell Ontology labels or ids, or free text).")
        if mode not in ("zero-shot", "generative"):
            raise ValueError(f"mode={mode!r}: use 'zero-shot' or 'generative'.")
        labels = _candidate_labels(candidate_labels)
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}: need a whole number of at least 1.")
        if top_k > len(labels):
            _warn(f"top_k={top_k} but only {len(labels)} candidate labels; returning {len(labels)}.")
        forward = {"mode": mode}
        if mode == "zero-shot":  # the labels' text features, once per call rather than once per chunk of cells
            forward["text_features"] = self._label_features(labels)
            forward["new_labels"] = self._new_labels(labels, open_set)
        else:
            if open_set:
                raise ValueError("open_set applies to mode='zero-shot'; the generative mode names trained types.")
            forward["constrained"] = constrained
        preprocess = {"gene_names": gene_names, "labels": labels, "mode": mode}
        return preprocess, forward, {"labels": labels, "top_k": min(top_k, len(labels))}

    def _call_parameters(self, candidate_labels=None, **kwargs) -> tuple[dict, dict, dict]:
        if not (candidate_labels or self._options.get("candidate_labels")):
            raise ValueError("Pass candidate_labels=[...] (Cell Ontology labels or ids, or free text).")
        return super()._call_parameters(candidate_labels=candidate_labels, **kwargs)

    def preprocess(self, cells, gene_names=None, labels=(), mode="zero-shot"):
        inputs = super().preprocess(cells, gene_names)
        if mode == "generative":
            return {**inputs, **self._prompt_inputs(ANNOTATE[0], len(inputs["cell_gene_ids"])), "labels": labels}
        return inputs

    @torch.no_grad()
    def _label_features(self, labels: list[str], batch_size: int = 64) -> torch.Tensor:
        """`(len(labels), projection_dim)` contrastive text features of the labels' descriptions."""
        tokenizer = self.processor.qformer_tokenizer or self.processor.tokenizer
        descriptions = [self._describe(label) for label in labels]
        # The Q-Former reads at most its position table's length (training truncates its texts too): a longer
        # description is cut to fit, and said so, rather than failing deep inside the embeddings.
        limit = self.model.config.qformer_config.max_position_embeddings
        cut = [label for label, ids in zip(labels, tokenizer(descriptions)["input_ids"]) if len(ids) > limit]
        if cut:
            _warn(
                f"{len(cut)} candidate label text(s) are longer than the Q-Former's {limit} positions and are cut to "
                f"their first {limit} tokens (e.g. {cut[0]!r}); pass shorter free-text labels to avoid it."
            )
        features = []
        for start in range(0, len(labels), batch_size):
            batch = descriptions[start : start + batch_size]
            texts = tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            texts = texts.to(self.device)
            features.append(self.model.get_text_features(texts["input_ids"], texts["attention_mask"]))
        return torch.cat(features)

    def _new_labels(self, labels: list[str], open_set: bool | None) -> torch.Tensor | None:
        """`(len(labels),)` bool, True for the candidates the model never trained on, where the open set applies:
        `open_set` is not False, the model has a reference, and the candidates mix new and trained types."""
        if open_set is False:
            return None
        known = getattr(self.model.config, "open_set_labels", None)
        if not known:
            if open_set:
                raise ValueError(
                    "open_set=True, but this model has no open-set reference (config.open_set_labels): it was "
                    "trained with open_set_reference_cells 0 or before the reference existed; pass open_set=False."
                )
            return None
        from .ontology import CellOntology

        ontology, known = CellOntology.load(), set(known)
        new = torch.tensor(
            [
                label not in known and (label if label in ontology else ontology.resolve(label, None)) not in known
                for label in labels
            ]
        )
        return new if 0 < int(new.sum()) < len(labels) else None

    @staticmethod
    def _describe(label: str) -> str:
        """`cell type: {label}. {definition}` for Cell Ontology ids or labels, the label alone otherwise."""
        from .ontology import CellOntology

        ontology = CellOntology.load()
        term = label if label in ontology else ontology.resolve(label, None)
        return ontology.describe({"cell_type": label, "cell_type_ontology_term_id": term})

    def _forward(self, inputs, mode="zero-shot", text_features=None, new_labels=None, constrained=True):
        if mode == "zero-shot":
            cells = self.model.get_cell_features(**cell_inputs(inputs))
            scale = getattr(self.model, "model", self.model).cell_tower.logit_scale.exp()
            text_features = text_features.to(cells)
            cosine = cells @ text_features.T
            logits = scale * cosine
            if new_labels is not None:
                novel = self.model.open_set_similarity(cells) < self.model.config.open_set_threshold
                if self.model.config.open_set_hubness_correction:
                    # CSLS (config docstring): a new cell ranks the texts by cosine minus half each text's
                    # similarity to the training cells, so a text near many of them does not draw every new cell.
                    hubness = self.model.open_set_similarity(text_features)
                    logits = torch.where(novel[:, None], scale * (cosine - hubness[None] / 2), logits)
                logits = logits.masked_fill(novel[:, None] & ~new_labels.to(cells.device)[None], float("-inf"))
            return logits.softmax(-1)
        if constrained:
            labels = list(inputs["labels"])
            end = self.model.generation_config.eos_token_id
            choice = _LabelChoice(
                [self.processor.tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels],
                end[0] if isinstance(end, (list, tuple)) else end,
                inputs["input_ids"].shape[1],
            )
            self._generate(inputs, max(map(len, choice.sequences)), choice)
            answers = [labels[i] for i in choice.chosen]
        else:
            answers = self.processor.batch_decode(self._generate(inputs, max_new_tokens=16), skip_special_tokens=True)
        return torch.tensor(
            [
                [difflib.SequenceMatcher(None, a.lower().strip(), c.lower()).ratio() for c in inputs["labels"]]
                for a in answers
            ]
        )

    def postprocess(self, scores, labels=(), top_k: int = 1):
        values, indices = scores.float().topk(top_k, dim=-1)
        return [
            [{"label": labels[i], "score": v} for v, i in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())
        ]

    def _open_output(self, path, n_cells, postprocess_params):
        k = postprocess_params["top_k"]
        return _CsvRowWriter(path, ["cell"] + [f"{name}_{j + 1}" for j in range(k) for name in ("label", "score")])

    def _write_rows(self, writer, start, ranked):
        writer.write(
            [start + i] + [x for r in row for x in (r["label"], f"{r['score']:.6g}")] for i, row in enumerate(ranked)
        )

    def _write(self, adata, results):
        adata.obs["scmmgpt_cell_type"] = [r[0]["label"] for r in results]
        adata.obs["scmmgpt_cell_type_score"] = [r[0]["score"] for r in results]


DEFAULT_DESCRIPTION_TOKENS = 64  # for models whose generation config sets no `max_new_tokens`


class CellDescriptionPipeline(ScMMGPTCellPipeline):
    """Cells to generated descriptions; written to `obs["scmmgpt_description"]`."""

    _pipeline_calls_generate = True

    def _sanitize_parameters(self, gene_names=None, prompt: str = DESCRIBE[0], max_new_tokens: int | None = None):
        if max_new_tokens is None:  # what stage 3 saved (its longest response, with room), else a paragraph
            max_new_tokens = self.model.generation_config.max_new_tokens or DEFAULT_DESCRIPTION_TOKENS
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: need a whole number of at least 1.")
        prompt = fit_instruction(
            self.processor, prompt, self.model.config.text_config.max_position_embeddings, max_new_tokens
        )
        return {"gene_names": gene_names, "prompt": prompt}, {"max_new_tokens": max_new_tokens}, {}

    def preprocess(self, cells, gene_names=None, prompt: str = DESCRIBE[0]):
        inputs = super().preprocess(cells, gene_names)
        return {**inputs, **self._prompt_inputs(prompt, len(inputs["cell_gene_ids"]))}

    def _forward(self, inputs, max_new_tokens: int = DEFAULT_DESCRIPTION_TOKENS):
        return self._generate(inputs, max_new_tokens)

    def postprocess(self, generated):
        return [t.strip() for t in self.processor.batch_decode(generated, skip_special_tokens=True)]

    def _open_output(self, path, n_cells, postprocess_params):
        return _CsvRowWriter(path, ["cell", "description"])

    def _write_rows(self, writer, start, texts):
        writer.write([start + i, text] for i, text in enumerate(texts))

    def _write(self, adata, results):
        adata.obs["scmmgpt_description"] = results


class TextToCellPipeline(_ScMMGPTPipeline):
    """Prompts (e.g. "a CD14-positive monocyte from blood") to an AnnData of pseudo-cells over the model's genes.

    Each prompt gives `n_cells` cells: the LM writes up to `max_text_tokens` sampled tokens (seeded) before the cell
    span, so cells differ by seed; with `max_text_tokens=0` the cell follows the prompt directly (one per prompt).
    One prompt is the contract's unit; `__call__` assembles the AnnData.
    """

    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self,
        n_cells: int = 1,
        seed: int = 0,
        max_text_tokens: int = 8,
        genes=None,
        sample: bool | None = None,
        temperature: float | None = None,
    ):
        if n_cells < 1:
            raise ValueError(f"n_cells={n_cells}: need at least 1 cell per prompt.")
        if sample is None:
            sample = bool(getattr(self.model.config, "expression_variance", False))
        forward = {
            "n_cells": n_cells,
            "max_text_tokens": max_text_tokens,
            "sample": sample,
            "temperature": temperature,
        }
        return {"genes": self._gene_names(genes), "n_cells": n_cells, "seed": seed}, forward, {}

    def _gene_names(self, genes) -> list[str]:
        vocab = self.processor.feature_extractor.gene_vocab
        if genes is not None:
            return list(genes)
        specials = {vocab.pad_token_id, vocab.cls_token_id, vocab.gene_to_id.get("<eoc>")}
        return [g for g, i in sorted(vocab.gene_to_id.items(), key=lambda kv: kv[1]) if i not in specials]

    def preprocess(self, prompt, genes=(), n_cells: int = 1, seed: int = 0):
        """`prompt` is `{"prompt": text, "index": i}`: cell k of prompt i draws with seed `seed + i * n_cells + k`,
        so cells from different prompts never share their random draws."""
        gene_ids = torch.as_tensor(self.processor.feature_extractor.gene_vocab.lookup(genes))
        if (gene_ids < 0).any():
            raise ValueError(
                f"Genes not in the vocabulary: {[n for n, i in zip(genes, gene_ids.tolist()) if i < 0][:5]}"
            )
        text = self.processor(
            text=[self.processor.build_prompt(prompt["prompt"], with_cell=False)], padding_side="left"
        )
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "gene_ids": gene_ids,
            "first_seed": seed + prompt["index"] * n_cells,
        }

    def _forward(self, inputs, n_cells: int = 1, max_text_tokens: int = 8, sample: bool = False, temperature=None):
        cells = []
        for k in range(n_cells):
            torch.manual_seed(inputs["first_seed"] + k)
            out = self.model.generate_cells(
                inputs["input_ids"],
                inputs["gene_ids"],
                inputs["attention_mask"],
                max_text_tokens=max_text_tokens,
                do_sample=max_text_tokens > 0,
                sample=sample,
                temperature=temperature,
            )
            cells.append(out.expression[0].float())
        return torch.stack(cells)

    def postprocess(self, expression):
        return expression.numpy()

    def __call__(self, prompts, **options):
        """Writes `n_cells` cells per prompt (`str` or list of `str`) into one AnnData, `obs` naming each cell's
        prompt and seed. The options are `_sanitize_parameters`' (`n_cells`, `seed`, `max_text_tokens`, `genes`,
        `sample`, `temperature`): `sample` draws expression from the decoder's per-gene Gaussian, by default where
        the model predicts a variance (`config.expression_variance`); `temperature` scales its standard deviation
        (default `config.expression_temperature`)."""
        import anndata as ad
        import pandas as pd

        preprocess, forward, postprocess = self._call_parameters(**options)  # resolved once: the genes sorted once
        genes, n_cells, seed = preprocess["genes"], preprocess["n_cells"], preprocess["seed"]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        written = forward["max_text_tokens"] + self.model.config.num_cell_tokens + 2  # text, <cell>, cells, </cell>
        context = self.model.config.text_config.max_position_embeddings
        prompts = [fit_instruction(self.processor, p, context, written, with_cell=False) for p in prompts]
        items = [{"prompt": p, "index": i} for i, p in enumerate(prompts)]
        per_prompt = list(self.get_iterator(items, 0, 1, preprocess, forward, postprocess))
        obs = [
            {"prompt": p, "prompt_index": i, "seed": seed + i * n_cells + k}
            for i, p in enumerate(prompts)
            for k in range(n_cells)
        ]
        return ad.AnnData(
            np.concatenate(per_prompt),
            obs=pd.DataFrame(obs, index=[f"pseudo_cell_{i}" for i in range(len(obs))]),
            var=pd.DataFrame(index=genes),
        )


def register_pipelines() -> None:
    PIPELINE_REGISTRY.register_pipeline(
        "cell-feature-extraction", CellFeatureExtractionPipeline, pt_model=ScMMGPTModel
    )
    PIPELINE_REGISTRY.register_pipeline(
        "cell-type-annotation", CellTypeAnnotationPipeline, pt_model=ScMMGPTForConditionalGeneration
    )
    PIPELINE_REGISTRY.register_pipeline(
        "cell-description", CellDescriptionPipeline, pt_model=ScMMGPTForConditionalGeneration
    )
    PIPELINE_REGISTRY.register_pipeline("text-to-cell", TextToCellPipeline, pt_model=ScMMGPTForConditionalGeneration)


__all__ = [
    "fit_instruction",
    "CellDescriptionPipeline",
    "CellFeatureExtractionPipeline",
    "CellTypeAnnotationPipeline",
    "TextToCellPipeline",
    "register_pipelines",
]

"""pipeline() tasks on real PBMC cells with a tiny model."""

import numpy as np
import pytest
import torch
from tester import ScMMGPTModelTester
from transformers import pipeline

from modeling_scmmgpt import ScMMGPTForConditionalGeneration
from modeling_scmmgpt.processing_scmmgpt import cell_inputs


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, pbmc_cell_processor):
    from conftest import make_tokenizer

    tester = ScMMGPTModelTester(pbmc_cell_processor, make_tokenizer())
    torch.manual_seed(0)
    config = tester.get_config()
    config.qformer_config.vocab_size = len(tester.processor.tokenizer)
    model = ScMMGPTForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("tiny_scmmgpt")
    model.save_pretrained(directory)
    tester.processor.save_pretrained(directory)
    return str(directory)


def test_feature_extraction_shapes_writeback_and_batch_invariance(saved_model, pbmc):
    extractor = pipeline("cell-feature-extraction", model=saved_model)
    adata = pbmc[:40].copy()
    features = extractor(adata, batch_size=16, write_to_adata=True, progress=False)
    assert features.shape == (40, 16) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert np.array_equal(adata.obsm["X_scmmgpt"], features)
    other = extractor(pbmc[[7, 3, 500]], batch_size=1, progress=False)
    assert np.abs(other[0] - features[7]).max() < 1e-5 and np.abs(other[1] - features[3]).max() < 1e-5
    dense = extractor(pbmc.raw.X[:40].toarray(), gene_names=list(pbmc.raw.var_names), batch_size=40, progress=False)
    assert np.abs(dense - features).max() < 1e-5


def test_feature_extraction_from_backed_h5ad_path(saved_model, pbmc, tmp_path):
    path = tmp_path / "cells.h5ad"
    pbmc.raw.to_adata()[:30].write_h5ad(path)
    extractor = pipeline("cell-feature-extraction", model=saved_model)
    extractor.processor.feature_extractor.use_raw = False
    from_path = extractor(str(path), batch_size=8, progress=False)
    with pytest.raises(ValueError, match="in-memory AnnData"):
        extractor(str(path), write_to_adata=True, progress=False)
    extractor.processor.feature_extractor.use_raw = True
    assert np.abs(from_path - extractor(pbmc[:30], progress=False)).max() < 1e-5


@pytest.mark.parametrize("mode", ["zero-shot", "generative"])
def test_annotation_top_k_ordering_and_writeback(saved_model, pbmc, mode):
    annotator = pipeline("cell-type-annotation", model=saved_model)
    labels = ["CL:0001054", "B cell", "natural killer cell", "a cluster nobody named"]
    adata = pbmc[:12].copy()
    results = annotator(adata, candidate_labels=labels, top_k=3, mode=mode, write_to_adata=True, progress=False)
    assert len(results) == 12
    for ranked in results:
        assert len(ranked) == 3 and {r["label"] for r in ranked} <= set(labels)
        scores = [r["score"] for r in ranked]
        assert scores == sorted(scores, reverse=True)
    assert list(adata.obs["scmmgpt_cell_type"]) == [r[0]["label"] for r in results]
    if mode == "zero-shot":
        assert all(0 <= r["score"] <= 1 for ranked in results for r in ranked)
    with pytest.raises(ValueError, match="candidate_labels"):
        annotator(adata, progress=False)


def test_description_writes_obs(saved_model, pbmc):
    describer = pipeline("cell-description", model=saved_model)
    adata = pbmc[:4].copy()
    texts = describer(adata, max_new_tokens=5, write_to_adata=True, progress=False)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert list(adata.obs["scmmgpt_description"]) == texts


def test_text_to_cell_gives_anndata_that_depends_on_prompt_and_seed(saved_model):
    generator = pipeline("text-to-cell", model=saved_model)
    prompts = ["a CD14-positive monocyte from blood", "a B cell from blood"]
    cells = generator(prompts, n_cells=3, seed=0, max_text_tokens=4)
    assert cells.shape[0] == 6 and cells.shape[1] > 600
    assert list(cells.obs["prompt"]) == [prompts[0]] * 3 + [prompts[1]] * 3
    X = cells.X
    assert np.isfinite(X).all()
    assert not np.allclose(X[:3].mean(0), X[3:].mean(0))  # different prompts, different mean profiles
    again = generator(prompts, n_cells=3, seed=0, max_text_tokens=4)
    assert np.array_equal(again.X, X)  # seeded
    assert not np.allclose(X[0], X[1])  # sampled text before the span: seeds give different cells
    few = generator(prompts[0], n_cells=1, genes=["LYZ", "MS4A1", "GNLY"], max_text_tokens=0)
    assert list(few.var_names) == ["LYZ", "MS4A1", "GNLY"] and few.shape == (1, 3)
    with pytest.raises(ValueError, match="CD14"):
        generator(prompts[0], genes=["CD14"], max_text_tokens=0)


def test_cell_pipeline_options_given_to_the_pipeline_hold_until_a_call_overrides_them(saved_model, pbmc):
    """Options given to `pipeline(...)` are resolved with each call's own: labels and top_k from the construction,
    a call's labels or top_k for that call only; a description budget that a call without one keeps."""
    cells = pbmc[:6]
    labels = ["B cell", "natural killer cell", "CL:0001054"]
    plain = pipeline("cell-type-annotation", model=saved_model)
    annotator = pipeline("cell-type-annotation", model=saved_model, candidate_labels=labels, top_k=2)
    assert annotator(cells, progress=False) == plain(cells, candidate_labels=labels, top_k=2, progress=False)
    assert all(len(ranked) == 1 for ranked in annotator(cells, top_k=1, progress=False))
    other = annotator(cells, candidate_labels=["T cell", "CD14-positive monocyte"], progress=False)
    assert {r["label"] for ranked in other for r in ranked} <= {"T cell", "CD14-positive monocyte"}
    assert all(len(ranked) == 2 for ranked in annotator(cells, progress=False))  # the construction's again
    with pytest.raises(ValueError, match="candidate_labels"):
        plain(cells, progress=False)
    with pytest.raises(ValueError, match="CellDescriptionPipeline has no option do_sample; its options: "):
        pipeline("cell-description", model=saved_model, do_sample=True)  # not silently dropped
    with pytest.raises(ValueError, match="TextToCellPipeline has no option batch_size, num_workers"):
        pipeline("text-to-cell", model=saved_model, batch_size=8, num_workers=2)  # one prompt at a time, in process
    assert pipeline("cell-description", model=saved_model, local_files_only=True)  # the factory's loading flag
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        pipeline("cell-description", model=saved_model, max_new_tokens=0)  # at construction, not at the first call
    extractor = pipeline("cell-feature-extraction", model=saved_model, batch_size=4)
    chunks, preprocess = [], extractor.preprocess
    extractor.preprocess = lambda chunk, **options: chunks.append(chunk.n_obs) or preprocess(chunk, **options)
    extractor(cells, progress=False)
    extractor(cells, batch_size=5, progress=False)
    assert chunks == [4, 2, 5, 1]  # the pipeline's batch_size, then the call's own
    describer = pipeline("cell-description", model=saved_model, max_new_tokens=2)
    short = pipeline("cell-description", model=saved_model)(cells, max_new_tokens=2, progress=False)
    assert describer(cells, progress=False) == short
    assert describer(cells, max_new_tokens=6, progress=False) != short


def test_a_label_text_longer_than_the_qformer_reads_is_cut_with_a_warning_at_the_callers_line(saved_model, pbmc):
    """A free-text label past the Q-Former's position table (64 in the tiny model) is cut to fit, and the warning
    points at the user's call, not inside the library."""
    annotator = pipeline("cell-type-annotation", model=saved_model)
    long_label = "a cell " + "that is very much like a B cell " * 20
    with pytest.warns(UserWarning, match="longer than the Q-Former's 64 positions") as caught:
        ranked = annotator(pbmc[:3], candidate_labels=["T cell", long_label], progress=False)
    assert len(ranked) == 3 and {r["label"] for cell in ranked for r in cell} <= {"T cell", long_label.strip()}
    assert [w.filename for w in caught if "Q-Former" in str(w.message)] == [__file__]


def test_text_to_cell_options_given_to_the_pipeline_hold_until_a_call_overrides_them(saved_model):
    """`pipeline("text-to-cell", n_cells=2, seed=5)`: every call writes 2 cells from seed 5, a call's own options win
    for that call only, and the genes given at construction are the AnnData's."""
    genes = ["LYZ", "MS4A1", "GNLY"]
    generator = pipeline("text-to-cell", model=saved_model, n_cells=2, seed=5, max_text_tokens=0, genes=genes)
    first = generator("a B cell from blood")
    assert first.shape == (2, 3) and list(first.var_names) == genes and list(first.obs["seed"]) == [5, 6]
    assert generator("a B cell from blood", n_cells=3, seed=0).shape == (3, 3)
    again = generator("a B cell from blood")
    assert list(again.obs["seed"]) == [5, 6] and np.array_equal(again.X, first.X)


def test_results_stream_to_files(saved_model, pbmc, tmp_path):
    import pandas as pd

    extractor = pipeline("cell-feature-extraction", model=saved_model)
    in_memory = extractor(pbmc[:20], batch_size=8, progress=False)
    streamed = extractor(pbmc[:20], batch_size=8, progress=False, output_file=tmp_path / "features.npy")
    assert isinstance(streamed, np.memmap) and np.array_equal(np.asarray(streamed), in_memory)
    with pytest.raises(ValueError, match=r"\.npy"):
        extractor(pbmc[:2], output_file=tmp_path / "features.csv", progress=False)
    with pytest.raises(ValueError, match="either write_to_adata or output_file"):
        extractor(pbmc[:2].copy(), output_file=tmp_path / "x.npy", write_to_adata=True, progress=False)

    annotator = pipeline("cell-type-annotation", model=saved_model)
    labels = ["B cell", "natural killer cell", "CL:0001054"]
    ranked = annotator(pbmc[:10], candidate_labels=labels, top_k=2, batch_size=4, progress=False)
    path = annotator(
        pbmc[:10], candidate_labels=labels, top_k=2, batch_size=4, progress=False, output_file=tmp_path / "labels.csv"
    )
    table = pd.read_csv(path)
    assert list(table["cell"]) == list(range(10))
    assert list(table["label_1"]) == [r[0]["label"] for r in ranked]
    assert np.allclose(table["score_2"], [r[1]["score"] for r in ranked], atol=1e-5)
    assert not list(tmp_path.glob("*.partial"))


def test_interrupted_stream_leaves_no_output_file(saved_model, pbmc, tmp_path):
    extractor = pipeline("cell-feature-extraction", model=saved_model)
    cells = pbmc.raw.X[:10].toarray()
    cells[7, 0] = np.nan  # fails mid-way, in the second chunk
    with pytest.raises(ValueError, match="NaN"):
        extractor(
            cells,
            gene_names=list(pbmc.raw.var_names),
            batch_size=4,
            progress=False,
            output_file=tmp_path / "features.npy",
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_every_task_runs_on_the_device_it_is_given(saved_model, pbmc, device):
    """The base class places the tensors (the pipelines move none themselves): all four tasks on an explicit device."""
    cells = pbmc[:6]
    extractor = pipeline("cell-feature-extraction", model=saved_model, device=device)
    assert extractor.device == torch.device("cpu") and extractor(cells, progress=False).shape == (6, 16)
    annotator = pipeline("cell-type-annotation", model=saved_model, device=device)
    for mode in ("zero-shot", "generative"):
        assert len(annotator(cells, candidate_labels=["B cell", "CL:0001054"], mode=mode, progress=False)) == 6
    describer = pipeline("cell-description", model=saved_model, device=device)
    assert len(describer(cells, max_new_tokens=3, progress=False)) == 6
    generator = pipeline("text-to-cell", model=saved_model, device=device)
    assert generator("a B cell", n_cells=2, max_text_tokens=0).shape[0] == 2


def test_interleaved_calls_on_one_pipeline_share_no_state(saved_model, pbmc):
    """Two lazy calls with different labels and modes, advanced in turns, give what each gives alone: the options
    travel with the call, not on the instance."""
    annotator = pipeline("cell-type-annotation", model=saved_model)
    first = dict(candidate_labels=["B cell", "natural killer cell", "CL:0001054"], top_k=2)
    second = dict(candidate_labels=["dendritic cell", "T cell"], mode="generative")
    chunks = lambda: (pbmc[i : i + 4] for i in range(0, 12, 4))  # noqa: E731
    alone = [annotator(pbmc[:12], batch_size=4, progress=False, **options) for options in (first, second)]
    a, b = annotator(chunks(), **first), annotator(chunks(), **second)
    together = [[], []]
    for chunk_a, chunk_b in zip(a, b):
        together[0] += chunk_a
        together[1] += chunk_b
    assert together == alone
    assert {r["label"] for ranked in together[1] for r in ranked} <= {"dendritic cell", "T cell"}
    assert all(len(ranked) == 2 for ranked in together[0]) and all(len(ranked) == 1 for ranked in together[1])


@pytest.mark.parametrize("complete", [True, False])
def test_stream_writer_cleans_up_when_the_last_flush_fails(tmp_path, complete):
    """A full disk can fail the final flush; the partial file is removed anyway and nothing is published."""
    from modeling_scmmgpt.pipelines import _NpyRowWriter

    writer = _NpyRowWriter(tmp_path / "out.npy", 2, 3)
    writer.write(np.zeros((2, 3)))
    real_close = writer.file.close

    def failing_close():
        real_close()
        raise OSError(28, "No space left on device")

    writer.file.close = failing_close
    if complete:
        with pytest.raises(OSError, match="No space"):
            writer.close(complete=True)
    else:
        writer.close(complete=False)  # the cleanup after another error must not raise over it
    assert not list(tmp_path.iterdir())


def test_candidate_labels_are_checked_before_any_cell_is_read(saved_model, pbmc):
    """One string is one label (not its characters); CL ids are normalised and must exist; empty labels and a
    top_k below 1 are refused; repeats are merged and a top_k beyond the labels is cut, each with a warning."""
    annotator = pipeline("cell-type-annotation", model=saved_model)
    cells = pbmc[:3]
    one = annotator(cells, candidate_labels="B cell", progress=False)
    assert [r[0]["label"] for r in one] == ["B cell"] * 3
    ids = annotator(cells, candidate_labels=["cl_0000236", "CL 0001054"], top_k=2, progress=False)
    assert {r["label"] for r in ids[0]} == {"CL:0000236", "CL:0001054"}
    with pytest.raises(ValueError, match="CL:9999999 is not a Cell Ontology id"):
        annotator(cells, candidate_labels=["B cell", "CL:9999999"], progress=False)
    with pytest.raises(ValueError, match="empty or non-text label"):
        annotator(cells, candidate_labels=["B cell", "  "], progress=False)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="top_k"):
            annotator(cells, candidate_labels=["B cell", "T cell"], top_k=bad, progress=False)
    with pytest.warns(UserWarning, match="repeats"):
        merged = annotator(cells, candidate_labels=["B cell", "T cell", "B cell"], top_k=2, progress=False)
    assert all({r["label"] for r in ranked} == {"B cell", "T cell"} for ranked in merged)
    with pytest.warns(UserWarning, match="only 2 candidate labels"):
        assert len(annotator(cells, candidate_labels=["B cell", "T cell"], top_k=5, progress=False)[0]) == 2


def test_a_call_resolves_its_options_and_label_texts_once(saved_model, pbmc):
    """Issue 15: one call checks its options once (not once in a pre-check and again in the base class) and encodes
    the candidate labels' texts once, not once per chunk of cells; the scores match encoding them per chunk."""
    from unittest import mock

    annotator = pipeline("cell-type-annotation", model=saved_model)
    labels = ["CL:0001054", "B cell", "natural killer cell"]
    model = annotator.model
    with (
        mock.patch.object(model, "get_text_features", wraps=model.get_text_features) as encode,
        mock.patch.object(annotator, "_sanitize_parameters", wraps=annotator._sanitize_parameters) as sanitize,
    ):
        ranked = annotator(pbmc[:20], candidate_labels=labels, top_k=3, batch_size=4, progress=False)
    assert encode.call_count == 1 and sanitize.call_count == 1  # five chunks
    with torch.no_grad():
        tokenizer = annotator.processor.qformer_tokenizer
        texts = tokenizer([annotator._describe(label) for label in labels], padding=True, return_tensors="pt")
        text = model.get_text_features(texts["input_ids"], texts["attention_mask"])
        inputs = annotator.preprocess(pbmc[16:20])
        cells = model.get_cell_features(**cell_inputs(inputs))
        expected = (model.model.cell_tower.logit_scale.exp() * cells @ text.T).softmax(-1)
    got = torch.tensor(
        [[r["score"] for r in sorted(row, key=lambda r: labels.index(r["label"]))] for row in ranked[16:]]
    )
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)


def test_label_choice_allows_only_label_continuations_and_stops_once_one_is_left():
    from modeling_scmmgpt.pipelines import _LabelChoice

    end, prompt = 0, [9, 9]
    choice = _LabelChoice([[5, 6], [5, 7, 8], [4]], end, prompt_length=2)
    assert choice.allowed(0, torch.tensor(prompt)) == [4, 5]
    assert choice.allowed(0, torch.tensor([*prompt, 5])) == [6, 7]
    assert choice.allowed(0, torch.tensor([*prompt, 5, 6])) == [end]  # a whole label: only the end
    assert choice.allowed(0, torch.tensor([*prompt, 3])) == [end]  # off the labels (a finished, padded row)
    rows = torch.tensor([[*prompt, 5], [*prompt, 4]])
    assert choice(rows, None).tolist() == [False, True] and choice.chosen == [None, 2]
    assert choice(torch.tensor([[*prompt, 5, 7], [*prompt, 4, end]]), None).tolist() == [True, True]
    assert choice.chosen == [1, 2]


def test_constrained_generative_annotation_names_a_whole_candidate_the_lm_prefers(saved_model, pbmc):
    """Constrained decoding: every answer is one whole candidate, the one the LM's tokens lead to. Pushing the LM
    towards the first word of one candidate makes it that candidate for every cell; pushing it towards a word no
    candidate has still gives whole candidates, where free decoding writes that word."""
    annotator = pipeline("cell-type-annotation", model=saved_model)
    tokenizer, lm_head = annotator.processor.tokenizer, annotator.model.lm_head
    labels = ["B cell", "dendritic cell", "natural killer cell"]
    cells = pbmc[:6].copy()
    for word, expected in (("natural", {"natural killer cell"}), ("Describe", None)):
        token = tokenizer.convert_tokens_to_ids(word)
        hook = lm_head.register_forward_hook(
            lambda module, args, out: out.index_add(-1, torch.tensor([token]), torch.full((*out.shape[:-1], 1), 100.0))
        )
        try:
            ranked = annotator(cells, candidate_labels=labels, mode="generative", progress=False)
            free = annotator.processor.batch_decode(
                annotator._generate(annotator.preprocess(cells, labels=labels, mode="generative"), 4),
                skip_special_tokens=True,
            )
        finally:
            hook.remove()
        answers = {r[0]["label"] for r in ranked}
        assert answers <= set(labels) and all(r[0]["score"] == 1.0 for r in ranked)
        assert answers == expected if expected else all(a.split()[0] == word for a in free)

"""The open-set reference: the model knows which cell types it trained on and which cells resemble none of its
training cells, so zero-shot annotation can name types it never trained on (issue 12, held-out types)."""

import numpy as np
import pytest
import torch
from conftest import tiny_demo

from modeling_scmmgpt import ScMMGPTForConditionalGeneration
from modeling_scmmgpt.pipelines import CellTypeAnnotationPipeline
from modeling_scmmgpt.processing_scmmgpt import cell_inputs
from trainers.open_set import fit_open_set_reference_


HELD_OUT = "CD19+ B"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model whose reference was fitted on the demo's training cells without the B cells."""
    model, processor, splits = tiny_demo(tmp_path_factory.mktemp("open_set"))
    train = splits["train"].filter(lambda r: r["cell_type"] != HELD_OUT)
    fits = fit_open_set_reference_(model, processor, train, splits["validation"], reference_cells=200)
    return model.eval(), processor, splits, train, fits


def _features(model, processor, records):
    cells = processor.feature_extractor(list(records))
    with torch.no_grad():
        return model.get_cell_features(**cell_inputs(cells))


def test_fit_keeps_the_training_types_and_sets_the_threshold_at_the_validation_quantile(fitted):
    model, processor, splits, train, fits = fitted
    config = model.config
    trained = set(train["cell_type"]) | set(train["cell_type_ontology_term_id"])
    assert set(config.open_set_labels) == trained and HELD_OUT not in config.open_set_labels
    assert fits["open_set_reference_cells"] == config.open_set_reference_size == 200
    torch.testing.assert_close(
        model.model.open_set_reference.features, _features(model, processor, train.select(range(200)))
    )
    # Validation cells of the held-out type are not cells of a trained type: the threshold leaves them out.
    known = [r for r in splits["validation"] if r["cell_type"] != HELD_OUT]
    assert fits["open_set_validation_cells"] == len(known) < len(splits["validation"])
    similarity = model.open_set_similarity(_features(model, processor, known))
    assert config.open_set_threshold == pytest.approx(float(np.quantile(similarity.numpy(), 0.05)))
    assert (similarity < config.open_set_threshold).float().mean() <= 0.06


def test_the_reference_survives_save_and_load(fitted, tmp_path):
    model, processor, _, train, _ = fitted
    reference = model.model.open_set_reference.features
    model.save_pretrained(tmp_path / "saved")
    loaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    for key in (
        "open_set_labels",
        "open_set_reference_size",
        "open_set_threshold",
        "open_set_neighbours",
        "open_set_hubness_correction",
    ):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    torch.testing.assert_close(loaded.model.open_set_reference.features, reference)
    cells = _features(model, processor, train.select(range(8)))
    torch.testing.assert_close(loaded.open_set_similarity(cells), model.open_set_similarity(cells))


def test_a_streamed_training_split_gives_the_types_of_its_first_cells(fitted):
    model, processor, splits, train, _ = fitted
    stream = train.select(range(30)).to_iterable_dataset()
    fits = fit_open_set_reference_(model, processor, stream, splits["validation"], reference_cells=20)
    first = train.select(range(20))
    assert fits["open_set_reference_cells"] == 20
    assert set(model.config.open_set_labels) == set(first["cell_type"]) | set(first["cell_type_ontology_term_id"])
    fit_open_set_reference_(model, processor, train, splits["validation"], reference_cells=200)  # restore


def _annotate(model, processor, cells, labels, **kwargs):
    pipe = CellTypeAnnotationPipeline(model=model, processor=processor, task=None)
    return [r[0]["label"] for r in pipe(cells, candidate_labels=labels, progress=False, **kwargs)]


def test_cells_below_the_threshold_are_named_among_the_new_candidates_only(fitted):
    model, processor, splits, _, _ = fitted
    test = splits["test"]
    trained = sorted(set(model.config.open_set_labels) & set(test["cell_type_ontology_term_id"]))
    new = ["CL:0000236", "natural killer cell"]  # B cell by id, NK by label: neither trained on
    labels = [*trained, *new]
    plain = _annotate(model, processor, test, labels, open_set=False)
    threshold = model.config.open_set_threshold
    try:
        model.config.open_set_threshold = 2.0  # every cell below it: taken for a new type
        assert set(_annotate(model, processor, test, labels)) <= set(new)
        # Candidates all trained on: nothing to name instead, the ranking is the plain one.
        assert _annotate(model, processor, test, trained) == _annotate(model, processor, test, trained, open_set=False)
        model.config.open_set_threshold = -2.0  # no cell below it
        assert _annotate(model, processor, test, labels) == plain
    finally:
        model.config.open_set_threshold = threshold
    # At the fitted threshold: only the cells below it change, and they change to a new candidate.
    similarity = model.open_set_similarity(_features(model, processor, test))
    mixed = _annotate(model, processor, test, labels)
    for label, before, novel in zip(mixed, plain, (similarity < threshold).tolist()):
        assert label in new if novel else label == before


def test_new_cells_rank_the_new_texts_by_csls(fitted):
    """`open_set_hubness_correction`: a new cell scores the new candidates by its cosine to each text minus half the
    text's similarity to the training cells; off, by the cosine alone."""
    model, processor, splits, _, _ = fitted
    test = splits["test"].select(range(40))
    trained = sorted(set(model.config.open_set_labels) & set(test["cell_type_ontology_term_id"]))
    new = ["CL:0000236", "CL:0000084"]  # B cell (held out) and T cell: neither trained on
    pipe = CellTypeAnnotationPipeline(model=model, processor=processor, task=None)
    # The tiny model's text path gives every definition the same feature; distinct unit vectors stand in for them.
    features = torch.nn.functional.normalize(
        torch.randn(len(trained) + 2, model.config.projection_dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    pipe._label_features = lambda labels: features[: len(labels)]
    texts = features[-2:]
    cells = _features(model, processor, test)
    scale = model.model.cell_tower.logit_scale.exp()
    reference, threshold = model.model.open_set_reference.features.clone(), model.config.open_set_threshold
    # The first new text made a hub: every reference cell sits on it, so the correction has something to correct.
    model.model.open_set_reference.features.copy_(texts[0].expand_as(reference))
    hubness = model.open_set_similarity(texts)
    assert hubness[0] - hubness[1] > 0.5

    def scores(correction: bool) -> torch.Tensor:
        """Each cell's probability of the first new candidate, from the pipeline."""
        model.config.open_set_hubness_correction = correction
        ranked = pipe(test, candidate_labels=[*trained, *new], top_k=2, progress=False)
        return torch.tensor([next(r["score"] for r in row if r["label"] == new[0]) for row in ranked])

    def expected(correction: bool) -> torch.Tensor:
        shift = hubness if correction else torch.zeros(2)
        return (scale * (cells @ texts.T - shift[None] / 2)).softmax(-1)[:, 0]

    try:
        model.config.open_set_threshold = 2.0  # every cell is new
        for correction in (True, False):
            torch.testing.assert_close(scores(correction), expected(correction), atol=1e-5, rtol=1e-4)
        assert (scores(True) < scores(False)).all()  # the hub's pull is taken off for every cell
    finally:
        model.model.open_set_reference.features.copy_(reference)
        model.config.open_set_threshold, model.config.open_set_hubness_correction = threshold, True


def test_open_set_needs_a_reference_and_the_zero_shot_mode(fitted, tmp_path):
    model, processor, splits, _, _ = fitted
    cells = splits["test"].select(range(4))
    with pytest.raises(ValueError, match="generative"):
        _annotate(model, processor, cells, ["CL:0000236", "CL:0000623"], mode="generative", open_set=True)
    bare, bare_processor, _ = tiny_demo(tmp_path)
    assert bare.config.open_set_labels is None and bare.model.open_set_reference is None
    with pytest.raises(ValueError, match="no open-set reference"):
        _annotate(bare.eval(), bare_processor, cells, ["CL:0000236", "CL:0000623"], open_set=True)
    assert len(_annotate(bare, bare_processor, cells, ["CL:0000236", "CL:0000623"])) == 4  # auto: off
    for wrong in (torch.zeros(3, 5), torch.zeros(0, model.config.projection_dim)):
        with pytest.raises(ValueError, match="need at least one cell"):
            model.model.set_open_set_reference(["x"], wrong, threshold=0.0)

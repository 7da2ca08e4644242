"""The options that let a randomly initialised cell side learn (issue 12): the cell summary and its PCA start, batch-
normalised contrastive heads, a sampled expression decoder that knows zeros, and per-path learning rates."""

import warnings

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_trainers import contrastive_trainer, make_model, pbmc_demo, stage_args, stage_processor  # noqa: F401
from tester import ScMMGPTModelTester, grad_norms

from modeling_scmmgpt import ScMMGPTConfig, ScMMGPTForConditionalGeneration, ScMMGPTForPreTraining
from modeling_scmmgpt.loss_scmmgpt import add_unexpressed_genes
from modeling_scmmgpt.metrics import PseudoCellGenerationMetric
from modeling_scmmgpt.processing_scmmgpt import cell_inputs
from trainers import ScMMGPTContrastiveArguments, ScMMGPTReconstructionArguments
from trainers.common import seeded_generator


@pytest.fixture
def tester(pbmc_cell_processor, tokenizer):
    return ScMMGPTModelTester(pbmc_cell_processor, tokenizer)


def _cells(tester, pbmc, n=120):
    inputs = tester.processor.feature_extractor(pbmc[:n])
    return inputs["cell_gene_ids"], inputs["cell_values"], inputs["cell_attention_mask"]


def test_recipe_options_are_off_by_default(tester):
    """A converted scGPT encoder (built with defaults) keeps exactly scGPT's computation and weights."""
    config = ScMMGPTConfig()
    assert not config.cell_summary and not config.contrastive_batch_norm and not config.expression_variance
    assert not config.bilinear_expression_readout and config.cell_config.gene_embedding_init == "random"
    assert config.cell_codebook_labels is None
    names = ScMMGPTForConditionalGeneration(tester.get_config()).state_dict()
    assert not any(
        key in n for n in names for key in ("summary", "feature_norm", "log_variance", "bilinear", "codebook")
    )


def test_pca_start_makes_the_cell_summary_the_standardised_pca_scores(pbmc, tester):
    tester.config_overrides = {"cell_summary": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    tower = model.model.cell_tower
    gene_ids, values, mask = _cells(tester, pbmc)
    tower.init_cell_summary_from_pca(gene_ids, values, mask)
    assert model.config.cell_config.gene_embedding_init == "pca"
    projection = tower.summary_projection.weight  # orthogonal columns: the shortcut keeps the scores' geometry
    torch.testing.assert_close(projection.T @ projection, torch.eye(projection.shape[1]), atol=1e-5, rtol=0)

    # Reference: PCA (numpy SVD) of the cells' weight vectors, the values normalised to sum 1 over real genes.
    real = (gene_ids != tester.processor.feature_extractor.gene_vocab.cls_token_id) & mask.bool()
    weights = values.clamp(min=0) * real
    weights = weights / weights.sum(1, keepdim=True)
    matrix = np.zeros((len(gene_ids), model.config.cell_config.vocab_size))
    np.add.at(
        matrix, (np.arange(len(gene_ids))[:, None].repeat(gene_ids.shape[1], 1), gene_ids.numpy()), weights.numpy()
    )
    centred = matrix - matrix.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = model.config.cell_config.hidden_size
    expected = u[:, :k] * np.sqrt(len(matrix) - 1)  # scores / their standard deviation

    with torch.no_grad():
        summary = tower.cell_summary(gene_ids, values, mask).double().numpy()
    signs = np.sign((summary * expected).sum(0))  # a component's sign is arbitrary
    np.testing.assert_allclose(summary * signs, expected, atol=1e-3)


def test_cell_summary_makes_a_new_models_cells_differ(pbmc, tester):
    """Without the summary, a random Q-Former gives nearly one output for every cell; with it, cells differ."""

    def spread(overrides):
        tester.config_overrides = overrides
        torch.manual_seed(0)
        model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
        gene_ids, values, mask = _cells(tester, pbmc, 60)
        if overrides:
            model.model.cell_tower.init_cell_summary_from_pca(gene_ids, values, mask)
        with torch.no_grad():
            pooled = model.model.cell_tower(gene_ids, values, mask).query_output.mean(1)
        return float((pooled - pooled.mean(0)).norm(dim=1).mean() / pooled.norm(dim=1).mean())

    assert spread({"cell_summary": True}) > 10 * spread({})


def test_contrastive_batch_norm_centres_in_training_and_is_batch_independent_in_eval(pbmc, tester):
    tester.config_overrides = {"contrastive_batch_norm": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    gene_ids, values, mask = _cells(tester, pbmc, 16)
    model.train()
    model.get_cell_features(gene_ids, values, mask)  # updates the running statistics
    norm = model.model.cell_tower.cell_feature_norm
    assert norm.num_batches_tracked.item() == 1
    with torch.no_grad():  # the first batch's statistics exactly, not 10% of them
        pooled = model.model.cell_tower(gene_ids, values, mask).query_output.mean(1)
    torch.testing.assert_close(norm.running_mean, pooled.mean(0), atol=1e-5, rtol=1e-4)
    # A training batch of one cell (an epoch's last batch) uses the running statistics and leaves them alone.
    running = norm.running_mean.clone()
    loss = model.get_cell_features(gene_ids[:1], values[:1], mask[:1]).sum()
    loss.backward()
    assert torch.equal(norm.running_mean, running) and norm.num_batches_tracked.item() == 1
    model.eval()
    with torch.no_grad():
        together = model.get_cell_features(gene_ids, values, mask)
        alone = torch.cat(
            [model.get_cell_features(gene_ids[i : i + 1], values[i : i + 1], mask[i : i + 1]) for i in range(3)]
        )
    torch.testing.assert_close(alone, together[:3], atol=1e-5, rtol=1e-4)


def _generate(model, tester, sample, **kwargs):
    processor = tester.processor
    inputs = processor(text=[processor.build_prompt("Generate a cell of type monocyte.", with_cell=False)])
    return model.generate_cells(
        inputs["input_ids"], torch.arange(10, 40), inputs["attention_mask"], sample=sample, **kwargs
    ).expression


def test_sampled_cells_differ_by_seed_and_repeat_with_it(tester):
    tester.config_overrides = {"expression_variance": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    draws = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        draws.append(_generate(model, tester, sample=True))
    assert (draws[0] >= 0).all()
    assert not torch.allclose(draws[0], draws[1])
    torch.testing.assert_close(draws[0], draws[2])
    torch.manual_seed(1)
    assert torch.equal(_generate(model, tester, sample=False), _generate(model, tester, sample=False))


def test_temperature_scales_the_sampled_deviation(tester):
    """With one seed, a cell sampled at temperature 0.5 lies halfway between the mean and the cell at 1 (where
    neither is clipped at zero); 0 gives the clipped mean; the config's value is the default."""
    tester.config_overrides = {"expression_variance": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()

    def draw(**kwargs):
        torch.manual_seed(0)
        return _generate(model, tester, sample=True, **kwargs)

    mean = _generate(model, tester, sample=False)
    one, half = draw(temperature=1.0), draw(temperature=0.5)
    torch.testing.assert_close(draw(temperature=0.0), mean.clamp(min=0))
    kept = (one > 0) & (half > 0)
    assert kept.sum() > 5
    torch.testing.assert_close((half - mean)[kept], 0.5 * (one - mean)[kept], atol=1e-5, rtol=1e-4)
    model.config.expression_temperature = 0.5
    torch.testing.assert_close(draw(), half)


def test_sampling_needs_a_variance_head(tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    with pytest.raises(ValueError, match="expression_variance=True"):
        _generate(model, tester, sample=True)


def test_variance_term_leaves_the_mean_to_its_mse(pbmc, tester):
    """The Gaussian term trains the variance only: the mean's gradient is that of the MSE alone."""
    gene_ids, _, mask = _cells(tester, pbmc, 4)
    expression = tester.processor.feature_extractor(pbmc[:4])["cell_expression"]
    tester.config_overrides = {"expression_variance": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    queries = torch.randn(4, tester.num_cell_tokens, 32)
    grads = {}
    for variance in (False, True):
        model.zero_grad()
        model.config.expression_variance = variance  # False: the MSE alone, on the same weights
        model.model.expression_loss(queries, gene_ids, expression, mask.bool()).backward()
        grads[variance] = model.model.expression_decoder.value_head.weight.grad.clone()
    assert sum(grad_norms(model, "model.expression_decoder.log_variance_head")) > 0
    torch.testing.assert_close(grads[True], grads[False])


def test_bilinear_readout_starts_at_zero_and_learns(pbmc, tester):
    gene_ids, _, mask = _cells(tester, pbmc, 4)
    expression = tester.processor.feature_extractor(pbmc[:4])["cell_expression"]
    queries = torch.randn(4, tester.num_cell_tokens, 32)
    tester.config_overrides = {"bilinear_expression_readout": True}
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    decoder = model.model.expression_decoder
    with torch.no_grad():
        with_term = model.model.decode_expression(queries, gene_ids)
        bilinear, decoder.bilinear = decoder.bilinear, None
        without = model.model.decode_expression(queries, gene_ids)
        decoder.bilinear = bilinear
    torch.testing.assert_close(with_term, without)  # zero at the start: the attention readout alone
    model.model.expression_loss(queries, gene_ids, expression, mask.bool()).backward()
    assert decoder.bilinear.weight.grad.abs().sum() > 0


def test_unexpressed_genes_are_zero_targets_never_expressed_or_special(tester):
    config = tester.get_config().cell_config
    gene_ids = torch.tensor(
        [[config.cls_token_id, 3, 4, 5], [config.cls_token_id, 6, config.pad_token_id, config.pad_token_id]]
    )
    expression = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[False, True, True, True], [False, True, False, False]])
    ids, targets, ok = add_unexpressed_genes(gene_ids, expression, valid, config, 400, seeded_generator(0))
    assert ids.shape == targets.shape == ok.shape == (2, 404)
    assert torch.equal(ids[:, :4], gene_ids) and torch.equal(ok[:, :4], valid)
    drawn, drawn_ok = ids[:, 4:], ok[:, 4:]
    assert (targets[:, 4:] == 0).all()
    assert not drawn_ok[(drawn == 3) | (drawn == config.cls_token_id) | (drawn == config.pad_token_id)][:1].any()
    assert not drawn_ok[0][(drawn[0] >= 3) & (drawn[0] <= 5)].any() and not drawn_ok[1][drawn[1] == 6].any()
    assert drawn_ok.float().mean() > 0.9  # almost every drawn gene is a real zero target


def test_generation_metric_sees_collapse_and_real_spread():
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (30, 20)), rng.normal(4, 1, (30, 20))])
    labels = ["a"] * 30 + ["b"] * 30
    metric = PseudoCellGenerationMetric()
    collapsed = metric.compute(
        predictions=np.repeat(real[[0, 30]], 5, axis=0),
        references=["a"] * 5 + ["b"] * 5,
        real_cells=real,
        real_labels=labels,
    )
    assert collapsed["within_type_spread"] == 0
    same = metric.compute(predictions=real, references=labels, real_cells=real, real_labels=labels)
    assert same["within_type_spread"] == pytest.approx(1.0) and same["centroid_correlation"] == pytest.approx(1.0)


def test_path_learning_rates_group_and_freeze(stage_processor, pbmc_demo, tmp_path):  # noqa: F811
    trainer = contrastive_trainer(stage_processor, pbmc_demo, tmp_path, text_path_learning_rate=1e-5, max_steps=1)
    tower = trainer.model.model.cell_tower
    optimizer = trainer.create_optimizer()
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    shared = tower.qformer.encoder.layer[0].attention.attention.query.weight
    assert rate_of[id(tower.text_embeddings.word_embeddings.weight)] == 1e-5
    assert rate_of[id(shared)] == 1e-5  # self-attention is shared by both paths
    assert rate_of[id(tower.qformer.encoder.layer[0].crossattention.attention.query.weight)] == 5e-3
    assert rate_of[id(tower.cell_projection.weight)] == 5e-3

    from trainers import ScMMGPTReconstructionCollator, ScMMGPTReconstructionTrainer

    args = stage_args(ScMMGPTReconstructionArguments, tmp_path, cell_path_learning_rate=0, max_steps=1)
    model = make_model(stage_processor)
    ScMMGPTReconstructionTrainer(
        model=model,
        args=args,
        processor=stage_processor.processor,
        data_collator=ScMMGPTReconstructionCollator(stage_processor.processor),
        train_dataset=pbmc_demo["train"],
    )
    tower = model.model.cell_tower
    assert not any(p.requires_grad for p in tower.cell_model.parameters())
    assert not any(p.requires_grad for p in tower.qformer.parameters())
    assert all(p.requires_grad for p in model.model.expression_decoder.parameters())


def test_contrastive_arguments_take_the_path_rates():
    args = ScMMGPTContrastiveArguments("out", text_path_learning_rate=0.0, use_cpu=True, report_to="none")
    assert args.text_path_learning_rate == 0.0 and args.cell_path_learning_rate is None


def test_ridge_fit_recovers_a_linear_map():
    from trainers.bridges import ridge_fit_

    torch.manual_seed(0)
    features, true = torch.randn(200, 6), torch.nn.Linear(6, 3)
    linear = torch.nn.Linear(6, 3)
    r2 = ridge_fit_(linear, features, true(features).detach(), l2=1e-9)
    assert r2 > 0.999999
    torch.testing.assert_close(linear.weight, true.weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(linear.bias, true.bias, atol=1e-4, rtol=0)


def test_least_squares_bridges_read_cells_as_their_labels(tmp_path):
    """After the fit, a training cell's tokens are closer to the LM embeddings of its own label than of others."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import _spread, fit_bridges
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)  # cells differ from the start
    records = list(splits["train"].select(range(120)))
    cells = processor.feature_extractor(records)
    model.model.cell_tower.init_cell_summary_from_pca(**cell_inputs(cells))
    fits = fit_bridges(model, processor, records)
    assert 0 < fits["projector_r2"] <= 1 and 0 < fits["cell_head_r2"] <= 1
    model.eval()
    labels = sorted({r["cell_type"] for r in records})
    embed = model.get_input_embeddings()
    tokens = [_spread(processor.tokenizer(label, add_special_tokens=False)["input_ids"], 8) for label in labels]
    label_embeds = embed(torch.tensor(tokens)).flatten(1)  # (labels, 8 * hidden)
    with torch.no_grad():
        cells = processor.feature_extractor(records)
        read = model.model.get_cell_token_embeddings(**cell_inputs(cells))
    nearest = torch.cdist(read.flatten(1), label_embeds).argmin(1)
    truth = torch.tensor([labels.index(r["cell_type"]) for r in records])
    majority = max((truth == i).float().mean() for i in range(len(labels)))
    assert (nearest == truth).float().mean() > majority  # better than naming the commonest type for every cell


def test_label_codebook_reads_cells_as_their_labels_and_is_saved(tmp_path):
    """The codebook fit: one entry per training label holding its token embeddings, the projector's output at zero,
    and training cells read as (close to) their own label's entry; the codebook and its labels survive save/load."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import _label_embeddings, fit_bridges
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)
    records = list(splits["train"].select(range(120)))
    cells = processor.feature_extractor(records)
    model.model.cell_tower.init_cell_summary_from_pca(**cell_inputs(cells))
    fits = fit_bridges(model, processor, records, parts=("codebook",))
    labels = sorted({r["cell_type"] for r in records})
    assert model.config.cell_codebook_labels == labels and "cell_head_r2" not in fits
    codebook = model.model.cell_codebook
    torch.testing.assert_close(codebook.entries.data, _label_embeddings(model, processor, labels))
    assert not model.model.multi_modal_projector.linear_2.weight.any()
    with torch.no_grad():
        read = model.eval().model.get_cell_token_embeddings(**cell_inputs(cells))
    nearest = torch.cdist(read.flatten(1), codebook.entries.flatten(1)).argmin(1)
    truth = torch.tensor([labels.index(r["cell_type"]) for r in records])
    assert fits["codebook_accuracy"] >= 0.9 and (nearest == truth).float().mean() >= 0.9

    model.save_pretrained(tmp_path / "saved")
    loaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.cell_codebook_labels == labels
    with torch.no_grad():
        again = loaded.model.get_cell_token_embeddings(**cell_inputs(cells))
    torch.testing.assert_close(again, read)


def test_label_codebook_needs_two_types(tmp_path):
    from conftest import tiny_demo

    from trainers.bridges import fit_bridges
    from trainers.data import load_pbmc
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    model, _ = build_model(load_pbmc(), tiny_lm=True)
    one_type = [r for r in splits["train"].select(range(120)) if r["cell_type"] == "CD14+ Monocyte"]
    with pytest.raises(ValueError, match="at least two cell types"):
        fit_bridges(model, processor, one_type, parts=("codebook",))


def test_generate_prompt_states_run_each_distinct_prompt_once_and_match_one_by_one(tmp_path):
    """The cell_head fit runs each distinct generate prompt through the LM once; every cell gets its own prompt's
    states, the same as running that prompt alone (left padding does not shift positions)."""
    from conftest import tiny_demo

    from trainers.bridges import _generate_prompt_states
    from trainers.data import load_pbmc
    from trainers.data.instructions import instruction_examples
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    model, _ = build_model(load_pbmc(), tiny_lm=True)
    model.eval()
    records = list(splits["train"].select(range(60)))
    prompts = [next(e for e in instruction_examples(r, 0) if e["task"] == "generate")["prompt"] for r in records]
    calls = []
    hook = model.model.language_model.register_forward_hook(
        lambda m, a, k, o: calls.append(k["inputs_embeds"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        together = _generate_prompt_states(model, processor, records, seed=0, batch_size=32)
    hook.remove()
    assert sum(calls) == len(set(prompts)) < len(records)
    with torch.no_grad():
        lengths = [len(processor.tokenizer(p)["input_ids"]) for p in prompts]
        for i in (lengths.index(min(lengths)), lengths.index(max(lengths))):  # the most padded, the least
            alone = _generate_prompt_states(model, processor, records[i : i + 1], seed=0, batch_size=1)
            torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)


def test_codebook_c_by_cross_validation(tmp_path):
    """`bridge_codebook_c 0`: the codebook's regularisation is the grid value with the best 5-fold accuracy on the
    fitting cells (scikit-learn's LogisticRegressionCV), so it differs from the fixed C=1 fit when the grid says so;
    a type with a single fitting cell cannot be cross-validated and is refused by name."""
    from conftest import pbmc_cells, tiny_demo
    from sklearn.linear_model import LogisticRegressionCV

    from trainers.bridges import _query_outputs, fit_bridges
    from trainers.default_model import build_model
    from trainers.instruction import ScMMGPTInstructionArguments

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)
    records = [r for r in splits["train"].select(range(200))]
    common = {t for t in {r["cell_type"] for r in records} if sum(r["cell_type"] == t for r in records) >= 5}
    records = [r for r in records if r["cell_type"] in common]
    fits = fit_bridges(model, processor, records, parts=("codebook",), codebook_c=0)
    with torch.no_grad():
        features = _query_outputs(model.eval().model, processor, records).flatten(1).double()
    standardised = ((features - features.mean(0)) / features.std(0).clamp(min=1e-6)).numpy()
    names = [r["cell_type"] for r in records]
    regression = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=5, scoring="accuracy", max_iter=2000)
    with warnings.catch_warnings():  # scikit-learn's defaults, which the library now states explicitly
        warnings.simplefilter("ignore", FutureWarning)
        expected = np.ravel(regression.fit(standardised, names).C_)[0]
    assert fits["codebook_c"] == pytest.approx(expected) != 1.0  # the grid picks another C than the default
    assert np.isclose(np.logspace(-4, 2, 7), fits["codebook_c"]).any()
    assert fit_bridges(model, processor, records, parts=("codebook",))["codebook_c"] == 1.0

    lonely = records + [next(r for r in splits["train"] if r["cell_type"] not in common)]
    with pytest.raises(ValueError, match="needs at least 2 fitting cells"):
        fit_bridges(model, processor, lonely, parts=("codebook",), codebook_c=0)
    with pytest.raises(ValueError, match="bridge_codebook_c=-1"):
        ScMMGPTInstructionArguments(output_dir=str(tmp_path / "x"), bridge_codebook_c=-1, use_cpu=True)


def test_codebook_confidence_sharpens_the_mixture_and_keeps_every_choice(tmp_path):
    """`bridge_codebook_confidence`: a strongly regularised codebook mixes softly; scaling its logits makes the
    fitting cells' mean top probability the requested one while every cell keeps its most likely label, on the
    fitting cells and on cells the fit never saw."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import _query_outputs, fit_bridges
    from trainers.default_model import build_model
    from trainers.instruction import ScMMGPTInstructionArguments

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)
    records, unseen = list(splits["train"].select(range(120))), list(splits["test"].select(range(40)))
    with torch.no_grad():
        queries = {
            name: _query_outputs(model.eval().model, processor, cells)
            for name, cells in (("fit", records), ("unseen", unseen))
        }

    def mixture(**kwargs):
        fits = fit_bridges(model, processor, records, parts=("codebook",), codebook_c=1e-3, **kwargs)
        with torch.no_grad():
            logits = {k: model.model.cell_codebook.classifier(q.flatten(1)) for k, q in queries.items()}
        return fits, {k: v.softmax(-1) for k, v in logits.items()}

    soft_fits, soft = mixture()
    crisp_fits, crisp = mixture(codebook_confidence=0.99)
    assert soft_fits["codebook_scale"] == 1.0 < crisp_fits["codebook_scale"]
    assert soft["fit"].amax(-1).mean() < 0.9  # strongly regularised: soft, so the scale has work to do
    assert crisp["fit"].amax(-1).mean().item() == pytest.approx(0.99, abs=1e-3)
    for name in queries:
        assert torch.equal(soft[name].argmax(-1), crisp[name].argmax(-1))
    assert crisp["unseen"].amax(-1).mean() > soft["unseen"].amax(-1).mean()
    with pytest.raises(ValueError, match="bridge_codebook_confidence=1.5"):
        ScMMGPTInstructionArguments(output_dir=str(tmp_path / "x"), bridge_codebook_confidence=1.5, use_cpu=True)


def test_codebook_entries_from_label_and_ontology_name(tmp_path):
    """`bridge_codebook_entries "label_and_name"`: each codebook entry holds the label's token embeddings on the first
    half of the cell positions and its Cell Ontology name's (the name descriptions use) on the second; the classifier
    is the same fit as with label entries. An unknown choice is refused in one line."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import _spread, fit_bridges
    from trainers.default_model import build_model
    from trainers.instruction import ScMMGPTInstructionArguments

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)
    records = list(splits["train"].select(range(120)))
    embed = model.model.get_input_embeddings()
    fit_bridges(model, processor, records, parts=("codebook",), codebook_c=1e-3)
    codebook = model.model.cell_codebook
    label_entries, label_classifier = codebook.entries.detach().clone(), codebook.classifier.weight.detach().clone()
    fit_bridges(model, processor, records, parts=("codebook",), codebook_c=1e-3, codebook_entries="label_and_name")
    codebook = model.model.cell_codebook
    torch.testing.assert_close(codebook.classifier.weight, label_classifier)
    labels, half = model.config.cell_codebook_labels, model.config.num_cell_tokens // 2
    b_cell = labels.index("CD19+ B")

    def tokens(text, length):
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return embed(torch.tensor(_spread(ids, length, keep_ends=True)))

    with torch.no_grad():
        torch.testing.assert_close(codebook.entries[b_cell, :half], tokens("CD19+ B", half))
        torch.testing.assert_close(codebook.entries[b_cell, half:], tokens("B cell", half))
        assert not torch.allclose(codebook.entries, label_entries)
    with pytest.raises(ValueError, match="bridge_codebook_entries='names'"):
        ScMMGPTInstructionArguments(output_dir=str(tmp_path / "x"), bridge_codebook_entries="names", use_cpu=True)


def _dense_expression(cells, vocab_size: int) -> torch.Tensor:
    """`(num_cells, vocab_size)` expression from the cell processor's output, 0 for the genes a cell does not list."""
    truth = torch.zeros(len(cells["cell_gene_ids"]), vocab_size)
    for row, (ids, values, mask) in enumerate(
        zip(cells["cell_gene_ids"], cells["cell_expression"], cells["cell_attention_mask"])
    ):
        truth[row, ids[mask.bool()]] = values[mask.bool()].float()
    return truth


def test_gene_readout_starts_at_zero_and_its_closed_form_fit_reconstructs_cells(tmp_path):
    """`gene_expression_readout`: the per-gene readout adds nothing until fitted (the decoder's output is the same
    as without it), and stage 2's `decoder_init="least_squares"` fit makes the decoder reproduce the fitting cells'
    expression over all genes far better than before, with the R^2 it reports matching `decode_expression`."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import fit_expression_readout_
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    plain, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True)
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True, gene_expression_readout=True)
    model.eval()
    inner, config = model.model, model.config.cell_config
    records = list(splits["train"].select(range(150)))
    cells = processor.feature_extractor(records)
    genes = torch.tensor([i for i in range(config.vocab_size) if i not in (config.pad_token_id, config.cls_token_id)])
    with torch.no_grad():
        queries = inner.cell_tower(**cell_inputs(cells)).query_output
        before = inner.decode_expression(queries, genes)
        torch.testing.assert_close(before, plain.eval().model.decode_expression(queries, genes))
    truth = _dense_expression(cells, config.vocab_size)
    truth = truth[:, genes]

    def r2(predicted):
        return float(1 - (truth - predicted).square().sum() / (truth - truth.mean()).square().sum())

    reported = fit_expression_readout_(inner, processor, records)
    with torch.no_grad():
        after = inner.decode_expression(queries, genes)
    assert reported == pytest.approx(r2(after), abs=1e-3)
    assert r2(after) > 0.4 and r2(after) > r2(before) + 0.4
    with pytest.raises(ValueError, match="gene_expression_readout=True"):
        fit_expression_readout_(plain.model, processor, records)
    with pytest.raises(ValueError, match="pass gene_ids"):
        inner.expression_decoder(queries, inner.cell_tower.cell_model.gene_encoder(genes)[None].expand(150, -1, -1))
    with pytest.raises(ValueError, match="decoder_init='fit'"):
        ScMMGPTReconstructionArguments(output_dir=str(tmp_path / "x"), decoder_init="fit", use_cpu=True)


def test_gene_variance_is_fitted_to_the_readouts_residuals_and_sampled_per_gene(tmp_path):
    """`gene_expression_variance`: the log-variance is one value per gene, the same for every cell and every batch;
    the least-squares fit sets it to the log of each gene's mean squared residual of the fitted decoder over the
    fitting cells; sampled cells at temperature 1 deviate from their mean by about that spread."""
    from conftest import pbmc_cells, tiny_demo

    from trainers.bridges import fit_expression_readout_
    from trainers.default_model import build_model

    _, processor, splits = tiny_demo(tmp_path)
    torch.manual_seed(0)
    options = dict(gene_expression_readout=True, expression_variance=True, gene_expression_variance=True)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, cell_summary=True, **options)
    model.eval()
    inner, config = model.model, model.config.cell_config
    decoder = inner.expression_decoder
    assert decoder.log_variance_head is None and not decoder.gene_log_variance.any()
    records = list(splits["train"].select(range(150)))
    cells = processor.feature_extractor(records)
    genes = torch.tensor([i for i in range(config.vocab_size) if i not in (config.pad_token_id, config.cls_token_id)])
    truth = _dense_expression(cells, config.vocab_size)
    fit_expression_readout_(inner, processor, records)
    with torch.no_grad():
        queries = inner.cell_tower(**cell_inputs(cells)).query_output
        mean, log_variance = inner.decode_expression(queries, genes, return_log_variance=True)
        _, alone = inner.decode_expression(queries[:1], genes, return_log_variance=True)
    residual_variance = (truth[:, genes] - mean).square().mean(0)
    model.save_pretrained(tmp_path / "fitted")  # the fitted buffer is saved with the weights
    reloaded = type(model).from_pretrained(tmp_path / "fitted").model.expression_decoder.gene_log_variance
    torch.testing.assert_close(reloaded, decoder.gene_log_variance, atol=0, rtol=0)
    torch.testing.assert_close(log_variance[0], residual_variance.clamp(min=1e-4).log(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(log_variance, log_variance[:1].expand_as(log_variance))
    torch.testing.assert_close(alone[0], log_variance[0])
    assert residual_variance.max() > 10 * residual_variance.median().clamp(min=1e-4)  # genes do differ
    # A generated cell samples each gene with that spread (where the mean is far enough from the zero clip).
    prompt = processor(text=[processor.build_prompt("Generate a cell of type monocyte.", with_cell=False)])

    def generate(**kwargs):
        return model.generate_cells(prompt["input_ids"], genes, prompt["attention_mask"], **kwargs).expression[0]

    expected, spread = generate(), torch.exp(0.5 * log_variance[0])
    far = expected > 4 * spread
    assert far.sum() > 10
    draws = []
    for seed in range(64):
        torch.manual_seed(seed)
        draws.append(generate(sample=True, temperature=1.0))
    measured = (torch.stack(draws) - expected)[:, far].std(0)
    torch.testing.assert_close(measured.mean(), spread[far].mean(), atol=0.0, rtol=0.15)
    # `@strict` validation wraps the config's own error.
    with pytest.raises(StrictDataclassClassValidationError, match="needs expression_variance=True"):
        ScMMGPTConfig(gene_expression_variance=True)


def test_reconstruction_trainer_fits_the_gene_readout_when_asked(stage_processor, pbmc_demo, tmp_path):  # noqa: F811
    """`decoder_init least_squares` fits the readout when the trainer is built (before step 0) and reports it; the
    default leaves it at zero."""
    from trainers import ScMMGPTReconstructionCollator, ScMMGPTReconstructionTrainer

    def trainer(variance=False, **options):
        config = stage_processor.get_config()
        config.qformer_config.vocab_size = len(stage_processor.processor.qformer_tokenizer)
        config.gene_expression_readout = True
        config.expression_variance = config.gene_expression_variance = variance
        torch.manual_seed(0)
        return ScMMGPTReconstructionTrainer(
            model=ScMMGPTForPreTraining(config),
            args=stage_args(ScMMGPTReconstructionArguments, tmp_path, max_steps=1, **options),
            processor=stage_processor.processor,
            data_collator=ScMMGPTReconstructionCollator(stage_processor.processor),
            train_dataset=pbmc_demo["train"],
        )

    fitted = trainer(decoder_init="least_squares", decoder_init_cells=64)
    assert 0 < fitted.decoder_fit < 1 and fitted.model.model.expression_decoder.gene_readout.abs().sum() > 0
    default = trainer()
    assert default.decoder_fit is None and not default.model.model.expression_decoder.gene_readout.any()
    # A per-gene variance is fitted with the readout, and training leaves it as fitted.
    fitted = trainer(variance=True, decoder_init="least_squares", decoder_init_cells=64)
    variance = fitted.model.model.expression_decoder.gene_log_variance.clone()
    assert variance.any()
    fitted.train()
    torch.testing.assert_close(fitted.model.model.expression_decoder.gene_log_variance, variance, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--decoder_init least_squares"):
        trainer(variance=True)


def test_reconstruction_stage_can_save_the_fitted_decoder_without_a_step(tmp_path):
    """`decoder_fit_only`: the stage saves the model exactly as fitted (the same weights as a step at learning rate
    0 from the same start), its validation loss is the same before and after, and real steps would have changed the
    decoder."""
    import json
    import os

    from safetensors.torch import load_file

    from trainers.run import run_stage

    config = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "reconstruction_tiny.yaml")

    def stage(name, *flags):
        out = tmp_path / name
        argv = [config, "--output_dir", str(out), "--max_train_samples", "16", "--max_eval_samples", "8"]
        argv += ["--save_strategy", "no", "--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "2"]
        run_stage("reconstruction", argv=argv + ["--decoder_init", "least_squares", *flags])
        return load_file(out / "model.safetensors"), json.loads((out / "stage_complete.json").read_text())

    fitted, metrics = stage("fit_only", "--decoder_fit_only", "true")
    still, _ = stage("lr_zero", "--learning_rate", "0")
    trained, _ = stage("trained")
    assert metrics["before"] == metrics["after"]
    assert fitted.keys() == still.keys()
    for key in fitted:
        torch.testing.assert_close(fitted[key], still[key], atol=0, rtol=0, msg=key)
    assert fitted["model.expression_decoder.gene_readout"].abs().sum() > 0
    assert not torch.equal(
        fitted["model.expression_decoder.value_head.weight"], trained["model.expression_decoder.value_head.weight"]
    )
    with pytest.raises(ValueError, match="decoder_fit_only=True keeps the closed-form fit"):
        ScMMGPTReconstructionArguments(output_dir=str(tmp_path / "x"), decoder_fit_only=True, use_cpu=True)

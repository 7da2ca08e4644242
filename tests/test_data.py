"""Cell-text builders on real PBMC cells: h5ad and SOMA sources, streaming, sharding, resuming, text, bad input."""

import logging
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from datasets.distributed import split_dataset_by_node

from modeling_scmmgpt.ontology import CellOntology, OntologyReport
from trainers.data import (
    PBMC_LABEL_TO_CELL_ONTOLOGY,
    ScMMGPTH5ADBuilder,
    ScMMGPTSomaBuilder,
    instruction_examples,
    load_pbmc_demo,
)


@pytest.fixture(scope="module")
def census_like(pbmc, tmp_path_factory):
    """The PBMCs in CELLxGENE Census schema, written as h5ad and as a TileDB-SOMA experiment."""
    import tiledbsoma.io

    ontology = CellOntology.load()
    adata = pbmc.raw.to_adata()
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    ids = [PBMC_LABEL_TO_CELL_ONTOLOGY[label] for label in labels]
    adata.obs = pd.DataFrame(
        {
            "cell_type": [ontology.label(i) for i in ids],
            "cell_type_ontology_term_id": ids,
            "tissue": "blood",
            "disease": "normal",
            "sex": "unknown",
            "development_stage": "unknown",
        },
        index=pbmc.obs_names,
    )
    adata.var["feature_name"] = adata.var_names
    directory = tmp_path_factory.mktemp("census_like")
    h5ad = str(directory / "pbmc.h5ad")
    adata.write_h5ad(h5ad)
    soma = str(directory / "soma")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiledbsoma.io.from_anndata(soma, adata, measurement_name="RNA", X_layer_name="raw")
    return {"adata": adata, "h5ad": h5ad, "soma": soma}


def _rows(dataset):
    return [dict(example) for example in dataset]


def _h5ad_builder(tmp_path, files, **kwargs):
    kwargs.setdefault("rows_per_shard", 128)
    kwargs.setdefault("rows_per_chunk", 50)
    return ScMMGPTH5ADBuilder(cache_dir=str(tmp_path / "cache"), h5ad_files=files, **kwargs)


def test_h5ad_and_soma_yield_the_same_cells_and_texts(census_like, tmp_path):
    h5ad = _rows(_h5ad_builder(tmp_path, [census_like["h5ad"]]).as_streaming_dataset("train"))
    soma_builder = ScMMGPTSomaBuilder(
        cache_dir=str(tmp_path / "cache_soma"),
        experiment_uris=[census_like["soma"]],
        rows_per_shard=128,
        rows_per_chunk=50,
    )
    soma = _rows(soma_builder.as_streaming_dataset("train"))
    soma_builder.download_and_prepare()
    assert _rows(soma_builder.as_dataset("train")) == soma
    assert len(h5ad) == len(soma) == 700
    for a, b in zip(h5ad, soma):
        assert a.pop("source") != b.pop("source")
        assert a == b
    adata = census_like["adata"]
    first = h5ad[0]
    assert first["cell_id"] == adata.obs_names[0]
    row = adata.X[0].toarray().ravel()
    assert len(first["gene_ids"]) <= (row > 0).sum()
    assert first["description"].startswith("cell type: " + adata.obs["cell_type"].iloc[0] + ". ")


def test_values_are_the_files_nonzero_entries(census_like, census_vocab, tmp_path):
    example = next(iter(_h5ad_builder(tmp_path, [census_like["h5ad"]]).as_streaming_dataset("train")))
    adata = census_like["adata"]
    row = adata.X[0].toarray().ravel()
    expected = {census_vocab[g]: v for g, v in zip(adata.var_names, row) if v > 0 and g in census_vocab}
    got = dict(zip(example["gene_ids"], example["values"]))
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_streaming_and_prepared_agree(census_like, tmp_path):
    builder = _h5ad_builder(tmp_path, {"train": [census_like["h5ad"]], "test": [census_like["h5ad"]]})
    builder.download_and_prepare()
    prepared = builder.as_dataset()
    streamed = builder.as_streaming_dataset()
    for split in ("train", "test"):
        assert _rows(prepared[split]) == _rows(streamed[split])


@pytest.mark.parametrize("rows_per_shard", [128, 100])  # 6 and 7 shards: even and uneven splits over 2 nodes
def test_two_node_split_is_disjoint_and_complete(census_like, tmp_path, rows_per_shard):
    stream = _h5ad_builder(tmp_path, [census_like["h5ad"]], rows_per_shard=rows_per_shard).as_streaming_dataset(
        "train"
    )
    ranks = [[e["cell_id"] for e in split_dataset_by_node(stream, rank=r, world_size=2)] for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(census_like["adata"].obs_names)
    assert abs(len(ranks[0]) - len(ranks[1])) <= rows_per_shard


def test_stream_resumes_exactly_from_saved_state(census_like, tmp_path):
    builder = _h5ad_builder(tmp_path, [census_like["h5ad"], census_like["h5ad"]])
    full = [e["cell_id"] + e["source"] for e in builder.as_streaming_dataset("train")]
    assert len(full) == 1400
    stream = builder.as_streaming_dataset("train")
    iterator = iter(stream)
    seen = [next(iterator)["cell_id"] for _ in range(333)]
    state = stream.state_dict()
    resumed = builder.as_streaming_dataset("train")
    resumed.load_state_dict(state)
    rest = [e["cell_id"] + e["source"] for e in resumed]
    assert len(seen) + len(rest) == len(full)
    assert rest == full[333:]


def test_stream_pickles_for_worker_processes(census_like, tmp_path):
    import pickle

    stream = _h5ad_builder(tmp_path, [census_like["h5ad"]]).as_streaming_dataset("train")
    first = [e["cell_id"] for e in stream]  # opens file handles inside the builder
    assert [e["cell_id"] for e in pickle.loads(pickle.dumps(stream))] == first


def test_buffered_shuffle_is_a_seeded_permutation(census_like, tmp_path):
    stream = _h5ad_builder(tmp_path, [census_like["h5ad"]]).as_streaming_dataset("train")
    a = [e["cell_id"] for e in stream.shuffle(seed=1, buffer_size=200)]
    b = [e["cell_id"] for e in stream.shuffle(seed=1, buffer_size=200)]
    c = [e["cell_id"] for e in stream.shuffle(seed=2, buffer_size=200)]
    assert a == b and a != c
    assert sorted(a) == sorted(census_like["adata"].obs_names)
    assert a != list(census_like["adata"].obs_names)


def test_pbmc_demo_splits(tmp_path):
    ds = load_pbmc_demo(cache_dir=str(tmp_path))
    sizes = {k: len(v) for k, v in ds.items()}
    assert sum(sizes.values()) == 700 and sizes["train"] == 489
    ids = [set(ds[s]["cell_id"]) for s in ds]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for split in ("validation", "test"):  # stratified: every type seen in training appears in proportion
        train, other = Counter(ds["train"]["cell_type"]), Counter(ds[split]["cell_type"])
        for label, n in other.items():
            assert abs(n / len(ds[split]) - train[label] / len(ds["train"])) < 0.05
    assert set(ds["train"]["cell_type_ontology_term_id"]) == set(PBMC_LABEL_TO_CELL_ONTOLOGY.values())
    again = load_pbmc_demo(cache_dir=str(tmp_path / "again"))
    assert again["test"]["cell_id"] == ds["test"]["cell_id"]
    other_seed = load_pbmc_demo(cache_dir=str(tmp_path / "seed1"), seed=1)
    assert other_seed["test"]["cell_id"] != ds["test"]["cell_id"]
    streamed = load_pbmc_demo(streaming=True, cache_dir=str(tmp_path))
    assert [e["cell_id"] for e in streamed["validation"]] == ds["validation"]["cell_id"]


def test_ontology_text_templates_and_matching():
    ontology = CellOntology.load()
    assert len(ontology.terms) > 3000
    record = {
        "cell_type": "CD14+ Monocyte",
        "cell_type_ontology_term_id": "CL:0001054",
        "tissue": "blood",
        "disease": "normal",
        "sex": "female",
        "development_stage": "adult stage",
    }
    paper = ontology.describe(record)
    assert paper == "cell type: CD14-positive monocyte. " + ontology.definition("CL:0001054")
    rich = ontology.describe(record, template="rich")
    assert rich.startswith(paper) and "It is a kind of monocyte." in rich
    assert "from blood" in rich and "adult stage female donor" in rich and "no disease" in rich
    report = OntologyReport()
    assert ontology.resolve("B cell", None, report) == "CL:0000236"  # by label
    assert ontology.resolve("nerve cell", None, report) == "CL:0000540"  # by synonym
    assert ontology.resolve("B cell", "CL:0000236", report) == "CL:0000236"  # by id
    assert ontology.resolve("my favourite cluster", None, report) is None
    assert (report.by_label, report.by_synonym, report.by_id) == (1, 1, 1)
    assert report.unmatched == {"my favourite cluster": 1}
    unmatched = {"cell_type": "my favourite cluster", "cell_type_ontology_term_id": None}
    assert ontology.describe(unmatched) == "cell type: my favourite cluster."


def test_unmatched_labels_are_counted_not_dropped(census_like, tmp_path, caplog):
    adata = census_like["adata"][:50].copy()
    del adata.obs["cell_type_ontology_term_id"]
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[:10] = "cluster 7"
    adata.obs["cell_type"] = labels
    path = str(tmp_path / "labels.h5ad")
    adata.write_h5ad(path)
    builder = _h5ad_builder(tmp_path, [path])
    with caplog.at_level(logging.WARNING):
        rows = _rows(builder.as_streaming_dataset("train"))
    assert len(rows) == 50
    assert builder.ontology_report.unmatched == {"cluster 7": 10}
    assert builder.ontology_report.by_label == 40
    assert [r["description"] for r in rows[:10]] == ["cell type: cluster 7."] * 10
    assert "10 unmatched" in caplog.text


def test_instruction_examples_are_seeded_and_varied():
    records = [
        {"cell_id": f"c{i}", "cell_type": "B cell", "description": "cell type: B cell.", "tissue": "blood"}
        for i in range(20)
    ]
    examples = [instruction_examples(r, seed=0) for r in records]
    assert [e["task"] for e in examples[0]] == ["describe", "annotate", "generate"]
    describe, annotate, generate = examples[0]
    assert describe["prompt"].startswith("<cell>") and describe["response"] == "cell type: B cell."
    assert annotate["response"] == "B cell" and annotate["cell_role"] == "input"
    assert "B cell from blood" in generate["prompt"] and generate["response"] == "<cell>"
    assert generate["cell_role"] == "output"
    assert examples == [instruction_examples(r, seed=0) for r in records]
    assert len({e[0]["prompt"] for e in examples}) > 1
    assert [e[0]["prompt"] for e in examples] != [instruction_examples(r, seed=1)[0]["prompt"] for r in records]


# --- bad input -------------------------------------------------------------------------------------------------------
def test_missing_and_corrupt_files_name_the_file(census_like, tmp_path):
    missing = str(tmp_path / "nope.h5ad")
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        _rows(_h5ad_builder(tmp_path, [missing]).as_streaming_dataset("train"))
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(open(census_like["h5ad"], "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated.h5ad is not a readable .h5ad file"):
        _rows(_h5ad_builder(tmp_path, [str(truncated)]).as_streaming_dataset("train"))
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.h5ad is not a readable .h5ad file"):
        _rows(_h5ad_builder(tmp_path, [str(garbage)]).as_streaming_dataset("train"))


def _write(tmp_path, name, adata):
    path = str(tmp_path / name)
    adata.write_h5ad(path)
    return path


def test_no_label_column_and_empty_file(census_like, tmp_path):
    import anndata as ad

    adata = census_like["adata"][:20].copy()
    bare = ad.AnnData(adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var)
    no_label = _write(tmp_path, "nolabel.h5ad", bare)
    with pytest.raises(KeyError, match="nolabel.h5ad: obs has no 'cell_type' column.*column_map"):
        _rows(_h5ad_builder(tmp_path, [no_label]).as_streaming_dataset("train"))
    empty = _write(tmp_path, "empty.h5ad", adata[:0].copy())
    with pytest.raises(ValueError, match="empty.h5ad has no cells"):
        _rows(_h5ad_builder(tmp_path, [empty]).as_streaming_dataset("train"))


@pytest.mark.parametrize("bad, message", [(np.nan, "NaN"), (-3.0, "negative")])
def test_bad_values_name_file_and_row(census_like, tmp_path, bad, message):
    adata = census_like["adata"][:30].copy()
    dense = adata.X.toarray()
    dense[17, 5] = bad
    adata.X = dense
    path = _write(tmp_path, "bad.h5ad", adata)
    with pytest.raises(ValueError, match=rf"bad.h5ad, row 17 \(cell {adata.obs_names[17]}\): .*{message}"):
        _rows(_h5ad_builder(tmp_path, [path]).as_streaming_dataset("train"))


def test_duplicated_genes_and_empty_cells_are_counted(census_like, tmp_path, caplog):
    adata = census_like["adata"][:40].copy()
    names = list(adata.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.var_names = names
    dense = adata.X.toarray()
    dense[[3, 9]] = 0.0
    adata.X = dense
    path = _write(tmp_path, "dups.h5ad", adata)
    builder = _h5ad_builder(tmp_path, [path])
    with caplog.at_level(logging.WARNING):
        rows = _rows(builder.as_streaming_dataset("train"))
    assert len(rows) == 38
    assert adata.obs_names[3] not in {r["cell_id"] for r in rows}
    assert "1 map to a gene already used" in caplog.text
    assert "skipped 2 cells with no expressed vocabulary genes" in caplog.text


def test_pbmc_demo_takes_a_model_vocabulary(pbmc_vocab, tmp_path):
    """A GeneVocab object gives the same examples as its saved file, through a stable content-named file, so a
    second call reuses the prepared dataset."""
    pbmc_vocab.save_pretrained(tmp_path / "vocab")
    by_path = load_pbmc_demo(gene_vocab=str(tmp_path / "vocab"), cache_dir=str(tmp_path / "a"))
    by_object = load_pbmc_demo(gene_vocab=pbmc_vocab, cache_dir=str(tmp_path / "b"))
    assert by_object["test"]["gene_ids"] == by_path["test"]["gene_ids"]
    assert max(max(g) for g in by_object["train"]["gene_ids"]) < len(pbmc_vocab)
    saved = list((tmp_path / "b" / "scmmgpt_gene_vocabs").iterdir())
    again = load_pbmc_demo(gene_vocab=pbmc_vocab, cache_dir=str(tmp_path / "b"))
    assert list((tmp_path / "b" / "scmmgpt_gene_vocabs").iterdir()) == saved and len(saved) == 1
    assert again["train"].cache_files == by_object["train"].cache_files

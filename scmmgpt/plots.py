"""The demo's pictures: learned cell embeddings coloured by true and predicted type, and generated against real
cells (co-embedding and mean marker expression per type). Uses scanpy's UMAP and matplotlib (no display needed)."""

from __future__ import annotations

import numpy as np


# Canonical PBMC markers (those measured in the demo data): monocytes, B, NK, T, dendritic cells.
PBMC_MARKERS = [
    "LYZ",
    "CST3",
    "FCGR3A",
    "MS4A1",
    "CD79A",
    "GNLY",
    "NKG7",
    "GZMB",
    "CD3E",
    "CD8A",
    "CD4",
    "IL7R",
    "CCR7",
    "FCER1A",
]


def _dense(matrix) -> np.ndarray:
    """A float32 array of a dense or sparse expression matrix."""
    return np.asarray(matrix.todense() if hasattr(matrix, "todense") else matrix, dtype=np.float32)


def _figure_backend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def annotate_test_cells(model, processor, adata, splits, descriptions: dict[str, str] | None = None):
    """The test split's cells as an AnnData with scMMGPT's embeddings (`obsm["X_scmmgpt"]`), zero-shot cell type
    (among the training types' Cell Ontology ids, shown as labels) and generated description in `obs`.
    `descriptions` (cell id to text, e.g. the evaluation's) are used where they cover every test cell."""
    from modeling_scmmgpt.pipelines import (
        CellDescriptionPipeline,
        CellFeatureExtractionPipeline,
        CellTypeAnnotationPipeline,
    )

    test = splits["test"]
    cells = adata[list(test["cell_id"])].copy()
    cells.obs["true_cell_type"] = list(test["cell_type"])
    features = CellFeatureExtractionPipeline(model=model, processor=processor, task=None)
    cells.obsm["X_scmmgpt"] = np.asarray(features(test, progress=False))
    id_to_label = dict(zip(splits["train"]["cell_type_ontology_term_id"], splits["train"]["cell_type"]))
    annotator = CellTypeAnnotationPipeline(model=model, processor=processor, task=None)
    ranked = annotator(test, candidate_labels=sorted(id_to_label), progress=False)
    cells.obs["scmmgpt_cell_type"] = [id_to_label[r[0]["label"]] for r in ranked]
    cells.obs["scmmgpt_cell_type_score"] = [r[0]["score"] for r in ranked]
    ids = [str(i) for i in test["cell_id"]]
    if descriptions is not None and all(i in descriptions for i in ids):
        cells.obs["scmmgpt_description"] = [descriptions[i] for i in ids]
    else:
        describer = CellDescriptionPipeline(model=model, processor=processor, task=None)
        cells.obs["scmmgpt_description"] = describer(test, progress=False)
    return cells


def embedding_umap(cells) -> None:
    """Adds the UMAP of `obsm["X_scmmgpt"]` to `cells` (`obsm["X_umap"]`), once: recolouring reuses it."""
    import scanpy as sc

    if "X_umap" in cells.obsm:
        return
    sc.pp.neighbors(cells, use_rep="X_scmmgpt", n_neighbors=min(10, cells.n_obs - 1), random_state=0)
    sc.tl.umap(cells, random_state=0)


def plot_embeddings(
    cells, path: str, columns=(("true_cell_type", "true type"), ("scmmgpt_cell_type", "scMMGPT zero-shot"))
) -> None:
    """UMAP of `obsm["X_scmmgpt"]`, one panel per `(obs column, title)` of `columns`, side by side."""
    import scanpy as sc

    plt = _figure_backend()
    embedding_umap(cells)
    fig, axes = plt.subplots(1, len(columns), figsize=(6.5 * len(columns), 5.5), squeeze=False)
    for ax, (column, title) in zip(axes[0], columns):
        sc.pl.umap(
            cells, color=column, ax=ax, show=False, title=f"scMMGPT cell embeddings: {title}", legend_fontsize=7
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def place_on_reference(generated, reference, type_column: str) -> None:
    """Places `generated` cells on a UMAP of `reference` cells' expression (PCA of the genes both have; UMAP fitted
    on the reference, then `transform` of the generated cells), and names each generated cell's nearest reference
    type (a 10-nearest-neighbour vote in PCA space) in `generated.obs["nearest_type"]`. Both AnnData hold expression
    in the model's values over gene names of its vocabulary; `reference.obs[type_column]` holds the types. Adds
    `obsm["X_umap"]` to both."""
    import umap
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    reference_genes = set(reference.var_names)
    genes = [g for g in generated.var_names if g in reference_genes]
    if len(genes) < 3:
        raise ValueError(f"The reference shares {len(genes)} genes with the generated cells; need at least 3.")

    ref, new = _dense(reference[:, genes].X), _dense(generated[:, genes].X)
    pca = PCA(n_components=min(30, ref.shape[0] - 1, len(genes) - 1), random_state=0).fit(ref)
    ref_pcs, new_pcs = pca.transform(ref), pca.transform(new)
    reducer = umap.UMAP(n_neighbors=min(15, len(ref) - 1), random_state=0).fit(ref_pcs)
    reference.obsm["X_umap"], generated.obsm["X_umap"] = reducer.embedding_, reducer.transform(new_pcs)
    vote = KNeighborsClassifier(n_neighbors=min(10, len(ref))).fit(ref_pcs, reference.obs[type_column].astype(str))
    generated.obs["nearest_type"] = vote.predict(new_pcs)


def plot_generated_cells(
    generated, path: str, markers: list[str], reference=None, type_column: str | None = None, max_real: int = 30
) -> None:
    """Generated cells on the reference UMAP (left, when a `reference` with `type_column` is given; see
    [`place_on_reference`]) and a heatmap of their `markers` beside up to `max_real` real cells of each generated
    cell's nearest type (right)."""
    import anndata as ad

    plt = _figure_backend()
    markers = [g for g in markers if g in generated.var_names]
    if not markers:
        raise ValueError("None of the marker genes is among the generated cells' genes; pick genes of the model.")
    parts = [generated[:, markers].copy()]
    parts[0].obs["group"] = "generated"
    if reference is not None:
        place_on_reference(generated, reference, type_column)
        rng = np.random.default_rng(0)
        for cell_type in dict.fromkeys(generated.obs["nearest_type"]):
            rows = np.flatnonzero(reference.obs[type_column].astype(str).to_numpy() == cell_type)
            real = reference[np.sort(rng.choice(rows, min(max_real, len(rows)), replace=False))][:, markers].copy()
            real.obs["group"] = f"real {cell_type}"
            parts.append(real)
    both = ad.concat(parts, index_unique="-")
    both.X = _dense(both.X)
    both.obs["group"] = both.obs["group"].astype("category")
    fig, axes = plt.subplots(
        1, 2 if reference is not None else 1, figsize=(14 if reference is not None else 7, 5.5), squeeze=False
    )
    if reference is not None:
        ax, coords = axes[0][0], reference.obsm["X_umap"]
        types = sorted(set(reference.obs[type_column].astype(str)))
        palette = dict(zip(types, plt.cm.tab20(np.linspace(0, 1, max(len(types), 2)))))
        ax.scatter(coords[:, 0], coords[:, 1], s=6, c=[palette[t] for t in reference.obs[type_column].astype(str)])
        placed = generated.obsm["X_umap"]
        ax.scatter(placed[:, 0], placed[:, 1], s=160, marker="*", c="k", label="generated")
        handles = [plt.Line2D([], [], marker="o", ls="", color=palette[t], label=t) for t in types]
        handles.append(plt.Line2D([], [], marker="*", ls="", color="k", markersize=10, label="generated"))
        ax.legend(handles=handles, fontsize=6, loc="best")
        ax.set_title("Generated cells (stars) on the reference cells' expression UMAP")
        ax.set_xticks([]), ax.set_yticks([])
    grid = both.X
    ax = axes[0][-1]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    groups = both.obs["group"].to_numpy()
    starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
    ax.set_yticks(starts, [groups[i] for i in starts], fontsize=7)
    for i in starts[1:]:
        ax.axhline(i - 0.5, color="w", lw=1.5)
    ax.set_xticks(range(len(markers)), markers, rotation=90, fontsize=7)
    ax.set_title("Marker expression per cell: generated, then real cells of the nearest type")
    fig.colorbar(image, ax=ax, shrink=0.7, label="expression (model values)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_generated_vs_real(model, processor, adata, splits, path: str, cells_per_type: int = 4) -> None:
    """Left: UMAP of real test cells and generated cells together (PCA of shared genes). Right: mean expression of
    marker genes per type, real against generated."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    from modeling_scmmgpt.pipelines import TextToCellPipeline
    from modeling_scmmgpt.prompts import generation_prompts

    plt = _figure_backend()
    test = splits["test"]
    real = adata[list(test["cell_id"])].raw.to_adata()
    genes = [g for g in real.var_names if g in processor.feature_extractor.gene_vocab]
    real = real[:, genes].copy()
    real.obs["cell_type"], real.obs["source"] = list(test["cell_type"]), "real"
    generator = TextToCellPipeline(model=model, processor=processor, task=None)
    types = sorted(set(test["cell_type"]))
    # One call, so every cell has its own draw (the pipeline seeds each prompt by its index).
    fake = generator(
        generation_prompts(types, cells_per_type, " from blood"), n_cells=1, max_text_tokens=0, genes=genes
    )
    fake.obs["cell_type"] = [cell_type for cell_type in types for _ in range(cells_per_type)]
    fake.obs["source"] = "generated"
    both = ad.concat([real, fake], index_unique="-")
    both.X = _dense(both.X)
    sc.pp.pca(both, n_comps=min(30, both.n_obs - 1, both.n_vars - 1), random_state=0)
    sc.pp.neighbors(both, n_neighbors=10, random_state=0)
    sc.tl.umap(both, random_state=0)

    fig, axes = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 1.3]})
    coords = both.obsm["X_umap"]
    palette = dict(zip(types, plt.cm.tab10(np.linspace(0, 1, len(types)))))
    for source, marker, size in (("real", "o", 12), ("generated", "*", 120)):
        rows = (both.obs["source"] == source).to_numpy()
        axes[0].scatter(
            coords[rows, 0],
            coords[rows, 1],
            c=[palette[t] for t in both.obs["cell_type"][rows]],
            marker=marker,
            s=size,
            edgecolors="k" if source == "generated" else "none",
            linewidths=0.4,
            label=source,
        )
    handles = [plt.Line2D([], [], marker="o", ls="", color=palette[t], label=t) for t in types]
    axes[0].legend(handles=handles, fontsize=6, loc="best", title="o real, * generated", title_fontsize=7)
    axes[0].set_title("Generated (stars) and real (dots) test cells, UMAP of shared genes")

    markers = [g for g in PBMC_MARKERS if g in genes]
    means = {}
    for source, data in (("real", real), ("generated", fake)):
        frame = pd.DataFrame(
            np.asarray(data[:, markers].X.todense() if hasattr(data.X, "todense") else data[:, markers].X),
            columns=markers,
        )
        frame["cell_type"] = data.obs["cell_type"].to_numpy()
        means[source] = frame.groupby("cell_type").mean().reindex(types)
    grid = np.concatenate([means["real"].to_numpy(), means["generated"].to_numpy()], axis=1)
    image = axes[1].imshow(grid, aspect="auto", cmap="viridis")
    axes[1].set_yticks(range(len(types)), types, fontsize=7)
    axes[1].set_xticks(range(2 * len(markers)), markers + markers, rotation=90, fontsize=7)
    axes[1].axvline(len(markers) - 0.5, color="w", lw=2)
    axes[1].set_title("Mean marker expression per type: real (left) | generated (right)")
    fig.colorbar(image, ax=axes[1], shrink=0.7, label="log-normalised expression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (label, x, y, width, colour) of the architecture figure's boxes; y grows upwards.
_ARCHITECTURE_BOXES = {
    "cell": ("cell\n(genes, values)", 0.2, 3.0, 1.6, "#e8e8e8"),
    "encoder": ("scGPT cell encoder\ngene + value embedding,\npost-norm transformer", 2.3, 3.0, 2.2, "#cfe2f3"),
    "qformer": ("Q-Former\nN learned queries,\ncross-attention", 5.0, 3.0, 2.0, "#d9ead3"),
    "mlp": ("MLP\nprojector", 7.5, 3.0, 1.3, "#d9ead3"),
    "lm": ("causal LM (LoRA)\n... <cell> <cell_0> ... <cell_N-1> </cell> ...", 9.3, 3.0, 3.4, "#fce5cd"),
    "text_out": ("text\n(description, cell type)", 13.2, 3.0, 1.9, "#e8e8e8"),
    "text_in": ("text\n(Cell Ontology definition)", 2.3, 0.8, 2.2, "#e8e8e8"),
    "text_path": ("Q-Former text path\n(BERT, e.g. MiniLM)", 5.0, 0.8, 2.0, "#d9ead3"),
    "itc": ("contrastive (ITC)\n+ matching (ITM)", 7.5, 0.8, 1.9, "#f4cccc"),
    "cell_head": ("cell_head (MLP)\nat <cell_i> outputs", 9.9, 0.8, 2.0, "#fce5cd"),
    "decoder": ("expression decoder\n(cell tokens, any genes)", 12.4, 0.8, 2.2, "#cfe2f3"),
}
_ARCHITECTURE_ARROWS = [
    ("cell", "encoder"),
    ("encoder", "qformer"),
    ("qformer", "mlp"),
    ("mlp", "lm"),
    ("lm", "text_out"),
    ("text_in", "text_path"),
    ("text_path", "itc"),
    ("qformer", "itc"),
    ("lm", "cell_head"),
    ("cell_head", "decoder"),
]


def plot_architecture(path: str) -> None:
    """scMMGPT's architecture as a block diagram (the README's figure)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    plt = _figure_backend()
    fig, ax = plt.subplots(figsize=(15.5, 4.2))
    height, centres = 1.2, {}
    for name, (label, x, y, width, colour) in _ARCHITECTURE_BOXES.items():
        ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", fc=colour, ec="#444", lw=1))
        ax.text(x + width / 2, y + height / 2, label, ha="center", va="center", fontsize=8.5)
        centres[name] = (x, y, width)
    for start, end in _ARCHITECTURE_ARROWS:
        (x0, y0, w0), (x1, y1, w1) = centres[start], centres[end]
        if y0 == y1:
            tail, head = (x0 + w0 + 0.05, y0 + height / 2), (x1 - 0.05, y1 + height / 2)
        else:  # vertical: from the bottom of the upper box to the top of the lower one
            tail = (min(max(x1 + w1 / 2, x0 + 0.2), x0 + w0 - 0.2), y0 - 0.05)
            head = (min(max(tail[0], x1 + 0.2), x1 + w1 - 0.2), y1 + height + 0.05)
        ax.add_patch(FancyArrowPatch(tail, head, arrowstyle="-|>", mutation_scale=12, color="#333", lw=1.2))
    ax.text(15.3, 1.4, "expression\nprofile", ha="center", va="center", fontsize=8.5)
    ax.add_patch(FancyArrowPatch((14.65, 1.4), (14.85, 1.4), arrowstyle="-|>", mutation_scale=12, color="#333"))
    ax.text(0.2, 4.75, "scMMGPT reads a cell (top row) and writes one (bottom right)", fontsize=9, style="italic")
    ax.text(
        0.2,
        0.2,
        "stage 1 aligns cells with text; stage 2 reconstructs expression; stage 3 tunes the LM on "
        "instructions and to write cells (<cell_i> hidden states regressed onto the Q-Former outputs)",
        fontsize=9,
        style="italic",
    )
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 5)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["PBMC_MARKERS", "annotate_test_cells", "plot_architecture", "plot_embeddings", "plot_generated_vs_real"]

"""`scmmgpt app`: a Gradio page in front of a model, for people who would rather look than code.

    scmmgpt app --model scmmgpt_demo/instruction [--port 7860]
    scmmgpt app --model user/scmmgpt-pbmc                      # a Hub repo: the only download

Three tabs, each a thin layer over the library's pipelines and plots:
- **Cells in**: upload an `.h5ad` (or the bundled PBMCs), read the gene-coverage report, embed (UMAP), annotate
  zero-shot or generatively against candidate types (Cell Ontology names autocomplete), read a cell's description,
  download the annotated `.h5ad` and a CSV;
- **Text to cells**: generate cells from a description, see their marker genes beside real cells of the nearest type
  and placed on the reference's UMAP, download them;
- **About**: the model card.

Each browser session keeps its cells and files in its own temporary folder, removed when the session ends. The same
`build_app` serves a Hugging Face Space (`write_space`).
"""

import functools
import os
import re
import shutil
import tempfile

import numpy as np


DEFAULT_MAX_CELLS = 2000  # a free CPU Space (2 vCPU) embeds and annotates this many in about a minute
MAX_GENERATED_CELLS = 32


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("The web app needs Gradio: pip install 'scmmgpt[app]'.") from None
    return gr


class AppSession:
    """One browser session's data: its cells, results and a temporary folder for uploads and downloads."""

    def __init__(self, root: str | None = None):
        self.root = root  # where the session's folder goes (default: the system's temporary folder)
        self._folder = None  # made on first use: a page that only looks writes nothing
        self.cells = None  # in-memory AnnData
        self.name = ""
        self.generated = None

    @property
    def folder(self) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="scmmgpt-app-", dir=self.root)
        return self._folder

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def model_folder(model: str) -> str:
    """A local model folder as it is; a Hub repo id downloaded once (the app's only download) to its snapshot."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model)


def load_model(model: str):
    """Model and processor from a local folder or a Hub repo id."""
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor

    folder = model_folder(model)
    return ScMMGPTForConditionalGeneration.from_pretrained(folder).eval(), ScMMGPTProcessor.from_pretrained(folder)


def model_card_text(folder: str) -> str:
    """The model card's text without its YAML front matter, or '' when the folder has none."""
    from huggingface_hub import ModelCard

    path = os.path.join(folder, "README.md")
    return ModelCard.load(path).text if os.path.isfile(path) else ""


class ScMMGPTApp:
    """The app's actions on a loaded model, one method per button, each returning what the page shows. Errors a
    user can fix come back as `ValueError` with one line; the page shows it and keeps running."""

    def __init__(self, model, processor, max_cells: int = DEFAULT_MAX_CELLS, model_card: str = ""):
        from modeling_scmmgpt.pipelines import (
            CellDescriptionPipeline,
            CellFeatureExtractionPipeline,
            CellTypeAnnotationPipeline,
            TextToCellPipeline,
        )

        self.model, self.processor, self.max_cells, self.model_card = model, processor, max_cells, model_card
        self.embedder = CellFeatureExtractionPipeline(model=model, processor=processor, task=None)
        self.annotator = CellTypeAnnotationPipeline(model=model, processor=processor, task=None)
        self.describer = CellDescriptionPipeline(model=model, processor=processor, task=None)
        self.generator = TextToCellPipeline(model=model, processor=processor, task=None)

    # --- cells in --------------------------------------------------------------------------------------------------
    def load_cells(self, session: AppSession, path: str | None, name: str | None = None) -> str:
        """Reads an uploaded `.h5ad` (or the PBMC demo when `path` is None) into the session; returns the coverage
        report. Refuses more cells than `max_cells` before reading the matrix."""
        from .files import count_cells, read_h5ad

        if path is None:
            from trainers.data import load_pbmc

            cells, name = load_pbmc(), "PBMC demo (700 cells, scanpy's pbmc68k_reduced)"
        else:
            name = name or os.path.basename(path)
            n_cells = count_cells(path)
            if n_cells > self.max_cells:
                raise ValueError(
                    f"{name} holds {n_cells} cells, more than this app's limit of {self.max_cells}; use the CLI "
                    "(`scmmgpt embed/annotate`) for atlases, or start the app with a larger --max-cells."
                )
            cells = read_h5ad(path, name=name)
            if cells.n_obs == 0:
                raise ValueError(f"{name} holds no cells.")
        # The genes' coverage, from the shared processor without touching its state (sessions run concurrently);
        # too little overlap raises, naming the fix.
        cell_processor = self.processor.feature_extractor
        _, names, source = cell_processor.matrix_and_genes(cells)
        _, coverage = cell_processor.gene_vocab.map_genes(names)
        coverage.check(cell_processor.min_vocab_coverage, f"{name} ({source})")
        session.cells, session.name = cells, name
        return f"**{name}**: {cells.n_obs} cells. Genes: {coverage}."

    def colour_columns(self, session: AppSession) -> list[str]:
        """Obs columns worth colouring by: categorical (or string) columns with at most 50 values."""
        obs = session.cells.obs
        return [c for c in obs.columns if obs[c].dtype.name in ("category", "object") and obs[c].nunique() <= 50]

    def embed(self, session: AppSession) -> None:
        cells = self._cells(session)
        if "X_scmmgpt" not in cells.obsm:
            self.embedder(cells, write_to_adata=True)

    def umap(self, session: AppSession, column: str | None) -> str:
        """Embeds (once) and draws the UMAP of the embeddings coloured by `column`; returns the image's path."""
        from .plots import plot_embeddings

        self.embed(session)
        cells = session.cells
        column = column if column in cells.obs else None
        path = session.path("umap_" + re.sub(r"[^\w.-]", "_", column or "none") + ".png")
        plot_embeddings(cells, path, columns=((column, column or "no colour"),))
        return path

    def annotate(self, session: AppSession, labels: list[str], mode: str, top_k: int):
        """Ranks `labels` for every cell; writes the top one to `obs` and returns the table (cell, top-k labels and
        scores)."""
        import pandas as pd

        cells = self._cells(session)
        if not labels:
            raise ValueError("Type or pick at least one candidate cell type.")
        ranked = self.annotator(cells, candidate_labels=list(labels), top_k=int(top_k), mode=mode, write_to_adata=True)
        for k in range(1, len(ranked[0])):
            cells.obs[f"scmmgpt_cell_type_{k + 1}"] = [r[k]["label"] for r in ranked]
            cells.obs[f"scmmgpt_cell_type_{k + 1}_score"] = [r[k]["score"] for r in ranked]
        rows = [
            [str(cell)] + [x for r in row for x in (r["label"], round(r["score"], 4))]
            for cell, row in zip(cells.obs_names, ranked)
        ]
        header = ["cell"] + [f"{name} {k + 1}" for k in range(len(ranked[0])) for name in ("type", "score")]
        return pd.DataFrame(rows, columns=header)

    def describe(self, session: AppSession, cell: str) -> str:
        """The generated description of one cell (kept in `obs["scmmgpt_description"]` for the download)."""
        cells = self._cells(session)
        if cell not in cells.obs_names:
            raise ValueError(f"No cell named {cell!r}; pick one from the table.")
        text = self.describer(cells[[cell]], progress=False)[0]
        if "scmmgpt_description" not in cells.obs:
            cells.obs["scmmgpt_description"] = ""
        cells.obs.loc[cell, "scmmgpt_description"] = text
        return text

    def downloads(self, session: AppSession) -> tuple[str, str]:
        """The session's cells with their results as `.h5ad`, and the results as CSV; returns both paths."""
        from modeling_scmmgpt.utils import atomic_output

        cells = self._cells(session)
        stem = os.path.splitext(os.path.basename(session.name))[0] if session.name.endswith(".h5ad") else "pbmc_demo"
        h5ad, csv = session.path(f"{stem}_scmmgpt.h5ad"), session.path(f"{stem}_scmmgpt.csv")
        with atomic_output(h5ad) as tmp:
            cells.write_h5ad(tmp)
        columns = [c for c in cells.obs.columns if c.startswith("scmmgpt_")]
        with atomic_output(csv) as tmp:
            cells.obs[columns].to_csv(tmp, index_label="cell_id")
        return h5ad, csv

    # --- text to cells -----------------------------------------------------------------------------------------------
    def generate(self, session: AppSession, prompt: str, n_cells: int, markers: list[str], seed: int = 0):
        """`n_cells` cells from `prompt`; returns (figure path, `.h5ad` path, a summary line). The figure places them
        on the session's cells (the reference) when some are loaded with a type column."""
        from modeling_scmmgpt.utils import atomic_output

        from .plots import plot_generated_cells

        if not prompt or not prompt.strip():
            raise ValueError(
                "Type a description of the cells to generate, e.g. 'a CD14-positive monocyte from blood'."
            )
        if not 1 <= int(n_cells) <= MAX_GENERATED_CELLS:
            raise ValueError(f"Ask for 1 to {MAX_GENERATED_CELLS} cells.")
        generated = self.generator(prompt.strip(), n_cells=int(n_cells), seed=int(seed))
        reference, type_column = self._reference(session)
        figure = session.path(f"generated_{seed}.png")
        plot_generated_cells(generated, figure, markers or [], reference=reference, type_column=type_column)
        path = session.path("generated_cells.h5ad")
        with atomic_output(path) as tmp:
            generated.write_h5ad(tmp)
        session.generated = generated
        summary = f"Generated {generated.n_obs} cells over {generated.n_vars} genes."
        if reference is not None:
            nearest = generated.obs["nearest_type"].value_counts()
            summary += " Nearest reference type: " + ", ".join(f"{t} ({n})" for t, n in nearest.items()) + "."
        return figure, path, summary

    def _reference(self, session: AppSession):
        """The session's cells as expression over vocabulary gene names, with the type column to compare against
        (scMMGPT's annotation where there is one, else the first categorical column); (None, None) without."""
        import anndata as ad
        import pandas as pd

        cells = session.cells
        if cells is None:
            return None, None
        columns = ["scmmgpt_cell_type"] if "scmmgpt_cell_type" in cells.obs else self.colour_columns(session)
        if not columns:
            return None, None
        cell_processor = self.processor.feature_extractor
        matrix, names, _ = cell_processor.matrix_and_genes(cells)
        ids, _ = cell_processor.gene_vocab.map_genes(names)
        keep = np.flatnonzero(ids >= 0)
        genes = [cell_processor.gene_vocab.id_to_gene[i] for i in ids[keep]]
        obs = pd.DataFrame({columns[0]: cells.obs[columns[0]].astype(str).to_numpy()}, index=cells.obs_names)
        return ad.AnnData(matrix[:, keep], obs=obs, var=pd.DataFrame(index=genes)), columns[0]

    def marker_genes(self) -> list[str]:
        from .plots import PBMC_MARKERS

        vocab = self.processor.feature_extractor.gene_vocab
        return [g for g in PBMC_MARKERS if g in vocab]

    def default_labels(self) -> list[str]:
        """The model's training types where it saved them (its cell codebook), else none."""
        return list(getattr(self.model.config, "cell_codebook_labels", None) or [])

    @staticmethod
    def _cells(session: AppSession):
        if session.cells is None:
            raise ValueError("Load cells first: upload an .h5ad file or use the PBMC demo.")
        return session.cells


def build_app(model: str, max_cells: int = DEFAULT_MAX_CELLS):
    """The Gradio `Blocks` for `model` (a local folder or Hub repo id). `.launch()` serves it."""
    gr = _gradio()
    from modeling_scmmgpt.ontology import CellOntology

    folder = model_folder(model)
    model_obj, processor = load_model(folder)
    card = model_card_text(folder)
    app = ScMMGPTApp(model_obj, processor, max_cells=max_cells, model_card=card)
    ontology_labels = CellOntology.load().labels()

    sessions: dict[str, AppSession] = {}  # by Gradio's session hash: one per open page
    # Gradio serves the sessions' files from where they are instead of copying them into its shared cache, so a
    # closed session's folder takes every copy of its data with it.
    root = tempfile.mkdtemp(prefix="scmmgpt-sessions-")
    gr.set_static_paths([root])

    def session_of(request: gr.Request) -> AppSession:
        if request.session_hash not in sessions:
            sessions[request.session_hash] = AppSession(root)
        return sessions[request.session_hash]

    def guarded(action):
        """Runs `action`; a user's error becomes a message on the page instead of a crash. The signature stays
        `action`'s, so Gradio passes the request and the progress tracker (which follows the pipelines' tqdm)."""

        @functools.wraps(action)
        def run(*args, **kwargs):
            try:
                return action(*args, **kwargs)
            except (ValueError, KeyError) as error:
                raise gr.Error(str(error).strip("'\""), print_exception=False) from None

        return run

    with gr.Blocks(title="scMMGPT", delete_cache=(3600, 3600), analytics_enabled=False) as page:
        gr.Markdown(
            f"# scMMGPT\nModel: `{model}`. Cells and text in one model: annotate, describe and generate cells."
        )
        with gr.Tabs():
            with gr.Tab("Cells in", id="cells"):
                with gr.Row():
                    upload = gr.File(
                        label="Upload an .h5ad file", file_types=[".h5ad"], type="filepath", elem_id="upload"
                    )
                    with gr.Column():
                        demo_button = gr.Button("Use the PBMC demo cells", variant="primary", elem_id="use-demo")
                        gr.Markdown(f"At most {max_cells} cells here; for atlases use the CLI (`scmmgpt annotate`).")
                status = gr.Markdown("No cells loaded yet.", elem_id="cells-status")
                with gr.Row():
                    colour = gr.Dropdown(label="Colour the UMAP by", choices=[], elem_id="colour")
                    embed_button = gr.Button("Embed and draw the UMAP", elem_id="embed")
                umap = gr.Image(label="UMAP of scMMGPT embeddings", type="filepath", elem_id="umap")
                with gr.Row():
                    labels = gr.Dropdown(
                        label="Candidate cell types (Cell Ontology names autocomplete; free text works too)",
                        choices=ontology_labels,
                        value=app.default_labels(),
                        multiselect=True,
                        allow_custom_value=True,
                        elem_id="labels",
                        scale=3,
                    )
                    mode = gr.Radio(["zero-shot", "generative"], value="zero-shot", label="Mode")
                    top_k = gr.Slider(1, 5, value=3, step=1, label="Top k")
                annotate_button = gr.Button("Annotate", variant="primary", elem_id="annotate")
                table = gr.Dataframe(
                    label="Cells and their top types (click a row to describe it)", interactive=False, elem_id="table"
                )
                with gr.Row():
                    cell = gr.Dropdown(label="Cell", choices=[], elem_id="cell")
                    description = gr.Textbox(label="Generated description", lines=4, elem_id="description", scale=3)
                with gr.Row():
                    download_h5ad = gr.DownloadButton(
                        "Download annotated .h5ad", elem_id="download-h5ad", interactive=False
                    )
                    download_csv = gr.DownloadButton("Download CSV", elem_id="download-csv", interactive=False)
            with gr.Tab("Text to cells", id="generate"):
                prompt = gr.Textbox(
                    label="Describe the cells", value="a CD14-positive monocyte from blood", elem_id="prompt"
                )
                with gr.Row():
                    n_cells = gr.Slider(1, MAX_GENERATED_CELLS, value=3, step=1, label="Cells", elem_id="n-cells")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    markers = gr.Dropdown(
                        label="Marker genes",
                        choices=app.marker_genes(),
                        value=app.marker_genes(),
                        multiselect=True,
                        allow_custom_value=True,
                    )
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                generated_status = gr.Markdown(elem_id="generated-status")
                generated_figure = gr.Image(label="Generated cells", type="filepath", elem_id="generated-figure")
                download_generated = gr.DownloadButton(
                    "Download generated .h5ad", elem_id="download-generated", interactive=False
                )
            with gr.Tab("About", id="about"):
                gr.Markdown(card or "This model has no model card.", elem_id="card")

        def after_load(session, report):
            columns = app.colour_columns(session)
            h5ad, csv = app.downloads(session)
            return (
                report,
                gr.update(choices=columns, value=columns[0] if columns else None),
                gr.update(choices=list(session.cells.obs_names[:5000]), value=None),
                None,
                None,
                gr.update(value=h5ad, interactive=True),
                gr.update(value=csv, interactive=True),
            )

        @guarded
        def load_demo(request: gr.Request):
            session = session_of(request)
            return after_load(session, app.load_cells(session, None))

        @guarded
        def load_upload(path, request: gr.Request):
            session = session_of(request)
            name = os.path.basename(path)  # the upload moves out of Gradio's shared cache into the session's folder
            moved = shutil.move(path, session.path(f"upload_{name}"))
            return after_load(session, app.load_cells(session, moved, name=name))

        load_outputs = [status, colour, cell, umap, table, download_h5ad, download_csv]
        demo_button.click(load_demo, None, load_outputs)
        upload.upload(load_upload, [upload], load_outputs)

        @guarded
        def embedded(column, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            session = session_of(request)
            return app.umap(session, column), *app.downloads(session)

        embed_button.click(embedded, [colour], [umap, download_h5ad, download_csv])

        @guarded
        def annotated(labels, mode, top_k, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            session = session_of(request)
            frame = app.annotate(session, labels, mode, top_k)
            columns = app.colour_columns(session)
            picture = app.umap(session, "scmmgpt_cell_type") if "X_scmmgpt" in session.cells.obsm else None
            return frame, gr.update(choices=columns, value="scmmgpt_cell_type"), picture, *app.downloads(session)

        annotate_button.click(annotated, [labels, mode, top_k], [table, colour, umap, download_h5ad, download_csv])

        def picked(evt: gr.SelectData, request: gr.Request):
            cells = session_of(request).cells
            return cells.obs_names[evt.index[0]] if cells is not None else None

        table.select(picked, None, [cell])

        @guarded
        def described(name, request: gr.Request):
            session = session_of(request)
            if not name:
                return "", *app.downloads(session)
            return app.describe(session, name), *app.downloads(session)

        cell.change(described, [cell], [description, download_h5ad, download_csv])

        @guarded
        def generated(prompt, n_cells, markers, seed, request: gr.Request):
            figure, path, summary = app.generate(session_of(request), prompt, n_cells, markers, seed)
            return figure, gr.update(value=path, interactive=True), summary

        generate_button.click(
            generated, [prompt, n_cells, markers, seed], [generated_figure, download_generated, generated_status]
        )

        def closed(request: gr.Request):  # the page was closed or reloaded: its files go with it
            sessions.pop(request.session_hash, AppSession()).close()

        page.unload(closed)
    return page


def write_space(folder: str, model_repo: str) -> list[str]:
    """Writes a Hugging Face Space for the app into `folder` (its `app.py`, `requirements.txt` and `README.md` with
    the Space's front matter), serving `model_repo`. Upload it with `huggingface-cli upload --repo-type space`."""
    from hub_cards import space_template_files

    os.makedirs(folder, exist_ok=True)
    written = []
    for name, text in space_template_files().items():
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace("{model_repo}", model_repo))
        written.append(path)
    return written


def serve(model: str, port: int = 7860, host: str = "127.0.0.1", max_cells: int = DEFAULT_MAX_CELLS, **launch):
    """Builds and serves the app (blocks until stopped)."""
    page = build_app(model, max_cells=max_cells)
    # One event at a time: torch already uses every core, and generation seeds torch's global generator.
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, **launch)


__all__ = [
    "AppSession",
    "DEFAULT_MAX_CELLS",
    "ScMMGPTApp",
    "build_app",
    "load_model",
    "model_card_text",
    "model_folder",
    "serve",
    "write_space",
]

"""Issue 16: the web app. Its actions on the `demo --fast` model (bad input gives one line, sessions are apart, a
session's folder goes when it ends), the Space template, and the real app driven in headless Chromium through
Selenium (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import anndata as ad
import numpy as np
import pytest
from conftest import pbmc_cells

from scmmgpt.app import AppSession, ScMMGPTApp, load_model, write_space


@pytest.fixture(scope="module")
def app(demo_dir):
    model, processor = load_model(str(demo_dir / "instruction"))
    return ScMMGPTApp(model, processor, max_cells=100)


@pytest.fixture
def session():
    opened = AppSession()
    yield opened
    opened.close()


def _small_h5ad(path, n_cells=12, genes=None):
    cells = pbmc_cells()[:n_cells].copy()
    if genes is not None:
        cells = ad.AnnData(np.ones((n_cells, len(genes)), dtype=np.float32), var={"gene": genes})
        cells.var_names = genes
        cells.raw = cells  # the demo model reads adata.raw
    cells.write_h5ad(path)
    return str(path)


def test_cells_in_annotate_describe_download(app, session, tmp_path):
    report = app.load_cells(session, _small_h5ad(tmp_path / "mine.h5ad"), name="mine.h5ad")
    assert "12 cells" in report and "genes" in report and "in the vocabulary" in report
    assert "bulk_labels" in app.colour_columns(session)
    image = app.umap(session, "bulk_labels")
    assert os.path.getsize(image) > 10_000 and session.cells.obsm["X_scmmgpt"].shape[0] == 12
    labels = app.default_labels()
    assert len(labels) >= 5  # the demo model saved its training types in its cell codebook
    table = app.annotate(session, labels, "zero-shot", 3)
    assert list(table.columns) == ["cell", "type 1", "score 1", "type 2", "score 2", "type 3", "score 3"]
    assert len(table) == 12 and set(table["type 1"]) <= set(labels)
    assert (table["score 1"] >= table["score 2"]).all()
    text = app.describe(session, session.cells.obs_names[3])
    assert text and session.cells.obs["scmmgpt_description"].iloc[3] == text
    h5ad, csv = app.downloads(session)
    back = ad.read_h5ad(h5ad)
    assert back.n_obs == 12 and "X_scmmgpt" in back.obsm and "scmmgpt_cell_type_3" in back.obs
    assert open(csv).readline().startswith("cell_id,scmmgpt_cell_type")
    assert os.path.dirname(h5ad) == session.folder


def test_text_to_cells_against_the_reference(app, session):
    app.load_cells(session, None)  # the bundled PBMCs
    figure, path, summary = app.generate(session, "a CD14-positive monocyte from blood", 3, app.marker_genes())
    cells = ad.read_h5ad(path)
    assert cells.n_obs == 3 and cells.n_vars > 500
    assert "Nearest reference type" in summary and os.path.getsize(figure) > 10_000
    assert set(session.generated.obs["nearest_type"]) <= set(session.cells.obs["bulk_labels"].astype(str))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"cell,gene\n1,2\n", r"text\.h5ad is not a readable \.h5ad file"),
        (b"", r"text\.h5ad is empty \(0 bytes\)"),
    ],
)
def test_not_an_h5ad_upload(app, session, tmp_path, content, message):
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        app.load_cells(session, str(path), name="text.h5ad")
    assert session.cells is None


def test_truncated_upload_and_no_overlap_and_too_many_cells(app, session, tmp_path):
    good = _small_h5ad(tmp_path / "good.h5ad")
    data = open(good, "rb").read()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.h5ad is not a readable \.h5ad file"):
        app.load_cells(session, str(tmp_path / "cut.h5ad"), name="cut.h5ad")
    strangers = _small_h5ad(tmp_path / "strangers.h5ad", genes=[f"NOTAGENE{i}" for i in range(40)])
    with pytest.raises(ValueError, match="in the vocabulary|measures"):
        app.load_cells(session, strangers)
    many = _small_h5ad(tmp_path / "many.h5ad", n_cells=101)
    with pytest.raises(ValueError, match=r"101 cells, more than this app's limit of 100; use the CLI"):
        app.load_cells(session, many, name="many.h5ad")
    assert session.cells is None


def test_nothing_loaded_empty_prompt_and_no_labels(app, session):
    with pytest.raises(ValueError, match="Load cells first"):
        app.annotate(session, ["B cell"], "zero-shot", 1)
    with pytest.raises(ValueError, match="Type a description"):
        app.generate(session, "   ", 3, [])
    app.load_cells(session, None)
    with pytest.raises(ValueError, match="at least one candidate"):
        app.annotate(session, [], "zero-shot", 1)


def test_sessions_are_apart_and_their_folders_go(app, tmp_path):
    first, second = AppSession(), AppSession()
    app.load_cells(first, _small_h5ad(tmp_path / "a.h5ad"))
    assert second.cells is None and first.folder != second.folder
    app.downloads(first)
    assert os.listdir(first.folder) and not os.listdir(second.folder)
    first.close(), second.close()
    assert not os.path.exists(first.folder) and not os.path.exists(second.folder)


def test_about_shows_the_card_without_its_front_matter(demo_dir):
    from scmmgpt.app import model_card_text

    text = model_card_text(str(demo_dir / "instruction"))
    assert text.lstrip().startswith("# scmmgpt-pbmc-demo") and "model-index" not in text
    assert "| task | metric | value | dataset (split) |" in text


def test_app_serves_a_hub_repo(demo_dir, tmp_path):
    """`--model owner/name`: the model is downloaded once from the Hub (a local Hub server here, through
    huggingface_hub's real client) and the app's actions run on it, card included."""
    from hub_server import LocalHub, _Repo

    folder = demo_dir / "instruction"
    with LocalHub() as hub:
        repo = hub.repos.setdefault("tester/scmmgpt-app", _Repo())
        repo.files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        env = hub.client_env(tmp_path / "hf_home", token=None)
        script = (
            "from scmmgpt.app import AppSession, ScMMGPTApp, load_model, model_card_text, model_folder\n"
            "app = ScMMGPTApp(*load_model('tester/scmmgpt-app'))\n"
            "session = AppSession()\n"
            "print(app.load_cells(session, None).split(':')[0])\n"
            "print(model_card_text(model_folder('tester/scmmgpt-app')).strip().splitlines()[0])\n"
            "session.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == [
        "**PBMC demo (700 cells, scanpy's pbmc68k_reduced)**",
        "# scmmgpt-pbmc-demo",
    ]
    assert os.listdir(tmp_path / "hf_home" / "hub")  # it came through the Hub cache


def test_space_template(tmp_path):
    written = write_space(str(tmp_path / "space"), "me/scmmgpt-pbmc")
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["README.md", "app.py", "requirements.txt"]
    readme = (tmp_path / "space" / "README.md").read_text()
    assert "sdk: gradio" in readme and "- me/scmmgpt-pbmc" in readme and "{model_repo}" not in readme
    app_py = (tmp_path / "space" / "app.py").read_text()
    compile(app_py, "app.py", "exec")
    assert '"me/scmmgpt-pbmc"' in app_py and "build_app" in app_py


# --- the real app in a real browser ---------------------------------------------------------------------------------
def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if os.environ.get("SCMMGPT_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory):
    """`scmmgpt app` on 127.0.0.1 with the demo --fast model, in its own process; its URL."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path_factory.mktemp("app_tmp"))}
    command = [sys.executable, "-m", "scmmgpt.cli", "app", "--model", str(demo_dir / "instruction")]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--max-cells", "1000"], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert process.poll() is None, open(log.name).read()[-3000:]
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the app did not start within 180 s:\n" + open(log.name).read()[-3000:])
    yield url, env["TMPDIR"]
    process.terminate()
    process.wait(timeout=30)


def _driver(downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return browser


def _wait(browser, condition, timeout=120, what="the page"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.5).until(lambda b: condition(b))
    except TimeoutException:
        raise AssertionError(
            f"timed out waiting for {what}; page text:\n{browser.find_element('tag name', 'body').text[-2000:]}"
        )


def _shot(browser, name, folder):
    browser.save_screenshot(str(folder / f"{name}.png"))
    extra = os.environ.get("SCMMGPT_APP_SCREENSHOTS")  # e.g. docs/app, with the full demo model
    if extra:
        os.makedirs(extra, exist_ok=True)
        browser.save_screenshot(os.path.join(extra, f"{name}.png"))


def _text(browser, css):
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_app_in_a_browser(served, tmp_path, pbmc):
    from selenium.webdriver.common.by import By

    url, server_tmp = served
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser = _driver(downloads)
    try:
        browser.get(url)
        _wait(browser, lambda b: b.find_elements(By.ID, "use-demo"), what="the app")
        browser.find_element(By.ID, "use-demo").click()
        _wait(browser, lambda b: "700 cells" in _text(b, "#cells-status"), what="the coverage report")
        assert "in the vocabulary" in _text(browser, "#cells-status")

        browser.find_element(By.ID, "embed").click()
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#umap img"), what="the UMAP image")
        browser.find_element(By.ID, "annotate").click()
        _wait(browser, lambda b: "AAAGCCTGGCTAAC-1" in _text(b, "#table"), what="the annotation table")
        assert "type 1" in _text(browser, "#table") and browser.find_elements(By.CSS_SELECTOR, "#umap img")
        _shot(browser, "cells_in", shots)

        cells = browser.find_elements(By.CSS_SELECTOR, "#table span.text:not(.header)")
        next(c for c in cells if c.is_displayed() and c.text == "AAAGCCTGGCTAAC-1").click()  # the first row
        _wait(
            browser,
            lambda b: b.find_element(By.CSS_SELECTOR, "#description textarea").get_attribute("value").strip(),
            what="a cell's description",
        )
        _shot(browser, "description", shots)

        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Text to cells')]").click()
        _wait(browser, lambda b: b.find_element(By.ID, "generate-button").is_displayed(), what="the generate tab")
        browser.find_element(By.ID, "generate-button").click()
        _wait(browser, lambda b: "Generated 3 cells" in _text(b, "#generated-status"), what="generated cells")
        assert browser.find_elements(By.CSS_SELECTOR, "#generated-figure img")
        _shot(browser, "text_to_cells", shots)
        browser.find_element(By.ID, "download-generated").click()
        done = _wait(
            browser,
            lambda b: [p for p in downloads.iterdir() if p.suffix == ".h5ad"],
            what="the downloaded .h5ad",
        )
        time.sleep(1)  # let Chromium finish renaming from .crdownload
        assert ad.read_h5ad(done[0]).n_obs == 3

        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'About')]").click()
        _wait(browser, lambda b: "scMMGPT" in _text(b, "#card"), what="the model card")
        _shot(browser, "about", shots)

        # A corrupt file gets a message in the page, and the app keeps serving.
        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Cells in')]").click()
        corrupt = tmp_path / "corrupt.h5ad"
        corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(corrupt))
        _wait(
            browser,
            lambda b: "not a readable .h5ad file" in b.find_element(By.TAG_NAME, "body").text,
            what="the error",
        )
        _shot(browser, "bad_upload", shots)
        assert urllib.request.urlopen(url, timeout=10).status == 200

        # A second browser session sees none of the first one's cells.
        browser.switch_to.new_window("tab")
        browser.get(url)
        _wait(browser, lambda b: "No cells loaded yet" in _text(b, "#cells-status"), what="a fresh session")
        browser.find_element(By.ID, "annotate").click()
        _wait(browser, lambda b: "Load cells first" in b.find_element(By.TAG_NAME, "body").text, what="the refusal")
    finally:
        browser.quit()

    # Closed sessions leave nothing behind: their folders, the uploads moved into them, are removed.
    def left():
        return [d for _, dirs, _ in os.walk(server_tmp) for d in dirs if d.startswith("scmmgpt-app-")]

    deadline = time.time() + 90
    while left() and time.time() < deadline:
        time.sleep(2)
    assert not left()
    uploads = [f for _, _, files in os.walk(server_tmp) for f in files if f.endswith(".h5ad")]
    assert not uploads, uploads
    assert sorted(p.name for p in shots.iterdir()) == [
        "about.png",
        "bad_upload.png",
        "cells_in.png",
        "description.png",
        "text_to_cells.png",
    ]

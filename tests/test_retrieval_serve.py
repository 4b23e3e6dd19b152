"""`retrieve.py serve` (issue 23 item 3-4): the JSON API and its errors, thumbnails of indexed rows only, the search
page driven in headless Chromium (skipped only when no browser is installed: `apt-get install chromium
chromium-driver`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'bcls[serve]'")
pytest.importorskip("httpx", reason="the API tests use starlette's TestClient (httpx)")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import load_example  # noqa: E402
from trainer_bcls.retrieval.image_sources import FolderSource  # noqa: E402
from trainer_bcls.retrieval.index import RetrievalIndex, RetrievalModel, build_index, embed_text_queries  # noqa: E402
from trainer_bcls.retrieval.serve import THUMB_SIZE, create_app, running_server  # noqa: E402

WORDS = ["a red circle", "a blue square", "green", "a big yellow triangle"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from trainer_bcls.towers.tiny_towers import build_tiny_model_and_processor

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(WORDS, image_size=32, projection_dim=16, vision="vit")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(12):
        size = (40 + 7 * i, 300 + 11 * i)  # some larger than a thumbnail
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.png")
    retrieval_model = RetrievalModel.from_pretrained(str(root / "model"), device="cpu")
    build_index(retrieval_model, FolderSource(root / "images"), root / "idx", show_progress=False)
    index = RetrievalIndex.load(root / "idx", mmap=True)
    return {"root": root, "index": index, "model": retrieval_model,
            "app": create_app(index, retrieval_model, default_top_k=5, max_upload_bytes=200_000)}


@pytest.fixture(scope="module")
def client(served):
    with TestClient(served["app"]) as test_client:
        yield test_client


def expected(served, text: str, top_k: int) -> list[str]:
    return [h.path for h in served["index"].search(embed_text_queries(served["model"], [text]), top_k)[0]]


def test_text_search_returns_the_index_hits_as_json(served, client):
    answer = client.get("/search", params={"q": "a red circle", "top_k": 4})
    assert answer.status_code == 200
    body = answer.json()
    assert body["query"] == "a red circle" and [h["rank"] for h in body["hits"]] == [1, 2, 3, 4]
    assert [h["path"] for h in body["hits"]] == expected(served, "a red circle", 4)
    assert all(set(h) >= {"rank", "path", "score"} for h in body["hits"])
    assert len(client.get("/search", params={"q": "green"}).json()["hits"]) == 5  # the server's default top_k


def test_image_upload_finds_that_image_first(served, client):
    path = Path(served["index"].paths[3])
    answer = client.post("/search", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"top_k": "3"})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    assert hits[0]["path"] == str(path) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(hits) == 3


def test_search_by_row_equals_search_by_that_image(served, client):
    path = Path(served["index"].paths[5])
    by_row = client.get("/search", params={"row": 5, "top_k": 4}).json()["hits"]
    by_image = client.post("/search", files={"image": (path.name, path.read_bytes(), "image/png")},
                           data={"top_k": "4"}).json()["hits"]
    assert [h["path"] for h in by_row] == [h["path"] for h in by_image]


@pytest.mark.parametrize("params, status, words", [
    ({"q": ""}, 400, "empty"),
    ({"q": "   "}, 400, "empty"),
    ({}, 400, "empty"),
    ({"q": "green", "top_k": "0"}, 400, "top_k"),
    ({"q": "green", "top_k": "-3"}, 400, "top_k"),
    ({"q": "green", "top_k": "ten"}, 400, "top_k"),
    ({"q": "green", "top_k": "100000"}, 400, "limit"),
    ({"row": "99"}, 404, "row 99"),
    ({"row": "x"}, 400, "row"),
])
def test_bad_queries_get_a_json_error_naming_the_problem(client, params, status, words):
    answer = client.get("/search", params=params)
    assert answer.status_code == status and words in answer.json()["error"]


def test_bad_uploads_get_a_json_error(client):
    answer = client.post("/search", files={"image": ("notes.txt", b"not an image at all", "text/plain")})
    assert answer.status_code == 415 and "notes.txt" in answer.json()["error"]
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big, "PNG")
    answer = client.post("/search", files={"image": ("big.png", big.getvalue(), "image/png")})
    assert answer.status_code == 413 and "upload limit" in answer.json()["error"]
    answer = client.post("/search", files={"other": ("a.png", b"x", "image/png")})
    assert answer.status_code == 400 and "'image'" in answer.json()["error"]
    answer = client.post("/search", content=b"raw", headers={"content-type": "application/octet-stream"})
    assert answer.status_code == 400 and "multipart" in answer.json()["error"]


def test_thumbnails_only_of_indexed_rows_and_size_bounded(served, client):
    answer = client.get("/thumb/2")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(answer.content)) as thumb:
        assert max(thumb.size) <= THUMB_SIZE
    for bad in ("12", "-1", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        answer = client.get(f"/thumb/{bad}")
        assert 400 <= answer.status_code < 500 and "image" not in answer.headers.get("content-type", "")
    assert client.get("/thumb/../../etc/passwd").status_code == 404
    client.get("/search", params={"q": "green", "top_k": 2})
    first = client.get("/search", params={"q": "green", "top_k": 2}).json()["hits"][0]
    assert client.get("/thumb/rank/1").content == client.get(f"/thumb/{first['row']}").content
    assert client.get("/thumb/rank/3").status_code == 404


def test_page_has_the_query_box_and_upload(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and 'type="file"' in page.text and "/thumb/" in page.text


def test_a_real_server_on_a_free_local_port_answers_and_stops(served):
    with running_server(served["app"]) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/search?q=green&top_k=2", timeout=10) as response:
            assert len(json.loads(response.read())["hits"]) == 2
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/search?q=green", timeout=2)


def test_serve_cli_checks_its_flags_before_loading(tmp_path, capsys):
    from trainer_bcls.cli import run_cli

    retrieve = load_example("retrieve")
    assert run_cli(retrieve.main, ["serve", "--index", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert run_cli(retrieve.main, ["serve", "--index", str(tmp_path / "none")]) == 2
    assert "index.json" in capsys.readouterr().err


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no browser: apt-get install chromium chromium-driver")
def test_browser_shows_thumbnails_of_the_expected_hits_and_a_click_searches_by_that_image(served):
    pytest.importorskip("selenium", reason="pip install selenium (in the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-extensions", "--window-size=1200,900"):
        options.add_argument(flag)
    with running_server(served["app"]) as url:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            driver.find_element(By.ID, "q").send_keys("a red circle")
            driver.find_element(By.ID, "go").click()
            wait = WebDriverWait(driver, 20)
            loaded = ("return [...document.querySelectorAll('#hits img')].filter(i => i.complete && "
                      "i.naturalWidth > 0).length")
            wait.until(lambda d: d.execute_script(loaded) == 5)
            figures = driver.find_elements(By.CSS_SELECTOR, "#hits figure.hit")
            assert [f.get_attribute("data-path") for f in figures] == expected(served, "a red circle", 5)
            assert all(f.find_element(By.TAG_NAME, "img").get_attribute("src").endswith(f"/thumb/{f.get_attribute('data-row')}")
                       for f in figures)
            clicked = figures[2].get_attribute("data-path")
            figures[2].click()
            wait.until(lambda d: clicked in d.find_element(By.ID, "status").text)
            first = driver.find_element(By.CSS_SELECTOR, "#hits figure.hit")
            assert first.get_attribute("data-path") == clicked  # the image itself is its own best hit
            driver.find_element(By.ID, "q").clear()
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: "empty" in d.find_element(By.ID, "error").text)
        finally:
            driver.quit()


def test_index_cli_records_the_type_and_search_cli_takes_the_search_flags(served, tmp_path, capsys):
    retrieve = load_example("retrieve")
    root = served["root"]
    summary = retrieve.main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--output",
                             str(tmp_path / "idx"), "--index_type", "hnsw", "--hnsw_m", "8", "--no_progress"])
    assert summary["index_type"] == "hnsw" and summary["index_params"] == {"M": 8}
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["index"]["requested"] == "hnsw" and manifest["index"]["params"] == {"M": 8}
    rows = retrieve.main(["search", "--index", str(tmp_path / "idx"), "--query", "a red circle", "--top_k", "3",
                          "--ef_search", "16", "--rescore"])
    assert [r["path"] for r in rows] == expected(served, "a red circle", 3)
    from trainer_bcls.cli import run_cli

    for argv, words in ((["--index_type", "ivf", "--pq_m", "4"], "--pq_m applies"),
                        (["--index_type", "annoy"], "--index_type"),
                        (["--index_type", "auto", "--max_index_memory", "lots"], "--max_index_memory")):
        capsys.readouterr()
        with pytest.raises(SystemExit) if "annoy" in argv or "lots" in argv else contextlib.nullcontext():
            code = run_cli(retrieve.main, ["index", "--model", str(root / "model"), "--images", str(root / "images"),
                                           "--output", str(tmp_path / "idx2"), *argv])
            assert code == 2
        assert words in capsys.readouterr().err

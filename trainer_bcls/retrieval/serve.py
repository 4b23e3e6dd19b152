"""Serve a [`RetrievalIndex`] over HTTP: a JSON search API and one search page (`retrieve.py serve`).

| request | answer |
| --- | --- |
| `GET /search?q=TEXT&top_k=K` | `{"query", "hits": [{"rank", "path", "score", "row"}]}` (search by text) |
| `GET /search?row=N&top_k=K` | the same, searching by the stored embedding of row N (the page's click on a hit) |
| `POST /search` (multipart field `image`, optional `top_k`) | the same, search by an uploaded image |
| `GET /thumb/<row>`, `GET /thumb/rank/<rank>` | a JPEG thumbnail (at most 256 px) of an indexed row, or of a hit of the last search |
| `GET /` | the page: a query box, an image upload, the hits as thumbnails with scores; clicking one searches by it |

Thumbnails are made only from rows of the index (never a path from the request). Bad requests get a 4xx JSON
`{"error": ...}` naming the problem: empty query, `top_k` not a positive integer (or over `max_top_k`), an unknown row,
an upload that is no image (415) or larger than `max_upload_bytes` (413). FastAPI and uvicorn are imported only here,
inside the functions (`pip install bcls[serve]`), so the package imports without them.
"""

import contextlib  # no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import io
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator

import torch

from ..data.image_loading import ImageLoadError, load_image
from .index import RetrievalIndex, RetrievalModel, SearchHit, embed_text_queries
from ..evaluation.split_evaluation import encode_images

THUMB_SIZE = 256
MAX_TOP_K = 1000
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
_THUMB_CACHE = 2048


class RequestError(Exception):
    """A bad request: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _import_framework():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
    except ImportError as err:
        raise ImportError(f"retrieve.py serve needs the serve extra: pip install 'bcls[serve]' "
                          f"(fastapi, uvicorn, python-multipart); {err}") from err
    return fastapi


def parse_top_k(value: Any, default: int, limit: int = MAX_TOP_K) -> int:
    if value is None or value == "":
        return default
    try:
        top_k = int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"top_k must be a positive integer, got {value!r}") from None
    if top_k < 1:
        raise RequestError(400, f"top_k must be a positive integer, got {top_k}")
    if top_k > limit:
        raise RequestError(400, f"top_k {top_k} is over the limit of {limit}")
    return top_k


class SearchService:
    """What the app does, without the web framework: search by text, row or image bytes; thumbnails of rows."""

    def __init__(self, index: RetrievalIndex, model: RetrievalModel, default_top_k: int = 12,
                 max_top_k: int = MAX_TOP_K, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 nprobe: int | None = None, ef_search: int | None = None, rescore: bool = False) -> None:
        self.index, self.model = index, model
        self.default_top_k, self.max_top_k, self.max_upload_bytes = default_top_k, max_top_k, max_upload_bytes
        self.search_options = {"nprobe": nprobe, "ef_search": ef_search, "rescore": rescore}
        self.row_of = {path: row for row, path in enumerate(index.paths)}
        self._last: list[SearchHit] = []
        self._lock = threading.Lock()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()

    def _answer(self, label: str, query: torch.Tensor, top_k: Any) -> dict:
        hits = self.index.search(query, parse_top_k(top_k, self.default_top_k, self.max_top_k),
                                 **self.search_options)[0]
        with self._lock:
            self._last = hits
        return {"query": label, "hits": [{"rank": h.rank, "path": h.path, "score": round(h.score, 6),
                                          "row": self.row_of[h.path]} for h in hits]}

    def search_text(self, text: str | None, top_k: Any = None) -> dict:
        if text is None or not text.strip():
            raise RequestError(400, "query q is empty: give the text to search for (GET /search?q=TEXT)")
        return self._answer(text, embed_text_queries(self.model, [text]), top_k)

    def search_row(self, row: Any, top_k: Any = None) -> dict:
        row = self._row(row)
        return self._answer(self.index.paths[row], self.index.embeddings[row : row + 1].clone(), top_k)

    def search_image(self, data: bytes | None, filename: str | None, top_k: Any = None) -> dict:
        if not data:
            raise RequestError(400, "no image: send the query image as the multipart field 'image'")
        if len(data) > self.max_upload_bytes:
            raise RequestError(413, f"image {filename!r} is over the upload limit of {self.max_upload_bytes} bytes")
        try:
            image = load_image(data, where="uploaded query image")
        except ImageLoadError as err:
            raise RequestError(415, f"upload {filename!r} is not a readable image: {err}") from None
        query = encode_images(self.model.model, self.model.processor, [image], show_progress=False)
        return self._answer(filename or "uploaded image", query, top_k)

    def _row(self, value: Any) -> int:
        try:
            row = int(str(value).strip())
        except ValueError:
            raise RequestError(400, f"row must be an integer, got {value!r}") from None
        if not 0 <= row < len(self.index):
            raise RequestError(404, f"row {row} is not in the index (rows 0..{len(self.index) - 1})")
        return row

    def row_of_rank(self, rank: Any) -> int:
        try:
            rank = int(str(rank).strip())
        except ValueError:
            raise RequestError(400, f"rank must be an integer, got {rank!r}") from None
        with self._lock:
            hits = list(self._last)
        if not 1 <= rank <= len(hits):
            raise RequestError(404, f"rank {rank} is not a hit of the last search ({len(hits)} hits)")
        return self.row_of[hits[rank - 1].path]

    def thumbnail(self, row: Any) -> bytes:
        """JPEG bytes of row `row`'s image, at most `THUMB_SIZE` px a side (only indexed files are read)."""
        row = self._row(row)
        with self._lock:
            if row in self._thumbs:
                self._thumbs.move_to_end(row)
                return self._thumbs[row]
        path = self.index.paths[row]
        if not os.path.isfile(path):
            raise RequestError(404, f"row {row} ({path}) is not an image file on this machine")
        try:
            image = load_image(path, where=f"row {row}")
        except ImageLoadError as err:
            raise RequestError(404, f"row {row}: {err}") from None
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._thumbs[row] = data
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data


def create_app(index: RetrievalIndex, model: RetrievalModel, **options: Any):
    """A FastAPI app serving `index` (options: those of [`SearchService`])."""
    _import_framework()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    service = SearchService(index, model, **options)
    app = FastAPI(title="BCLS search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def request_error(_request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(ValueError)
    async def value_error(_request, err: ValueError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{COUNT}}", str(len(index))).replace("{{TOP_K}}", str(service.default_top_k))

    @app.get("/search")
    def search(q: str | None = None, top_k: str | None = None, row: str | None = None) -> dict:
        if row is not None:
            return service.search_row(row, top_k)
        return service.search_text(q, top_k)

    @app.post("/search")
    async def search_image(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > service.max_upload_bytes + 64 * 1024:
            raise RequestError(413, f"request of {length} bytes is over the upload limit of "
                               f"{service.max_upload_bytes} bytes")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(400, "POST /search takes multipart/form-data with the image in the field 'image'")
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "no image: send the query image as the multipart field 'image'")
        data = await upload.read(service.max_upload_bytes + 1)
        top_k = form.get("top_k") or request.query_params.get("top_k")
        # model work off the event loop
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(service.search_image, data, upload.filename, top_k)

    @app.get("/thumb/rank/{rank}")
    def thumb_of_rank(rank: str) -> Response:
        return Response(service.thumbnail(service.row_of_rank(rank)), media_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})

    @app.get("/thumb/{row}")
    def thumb(row: str) -> Response:
        return Response(service.thumbnail(row), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` in a thread on `host:port` (a free port by default); yields the base URL, always stops it."""
    import uvicorn

    port = free_port(host) if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>BCLS search</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
form { display: inline-block; margin-right: 1.5em; }
#hits { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1em; }
figure.hit { margin: 0; width: 180px; cursor: pointer; text-align: center; }
figure.hit img { max-width: 176px; max-height: 176px; border: 2px solid #ccc; }
figure.hit figcaption { font-size: 12px; word-break: break-all; }
#error { color: #b00; }
</style></head>
<body>
<h1>BCLS search <small>({{COUNT}} images)</small></h1>
<form id="text-form"><input id="q" name="q" size="40" placeholder="describe an image" autofocus>
 <button id="go" type="submit">Search</button></form>
<form id="image-form"><input id="image" name="image" type="file" accept="image/*">
 <button id="go-image" type="submit">Search by image</button></form>
<div id="status"></div><div id="error"></div><div id="hits"></div>
<script>
const topK = {{TOP_K}};
function show(answer) {
  document.getElementById("error").textContent = "";
  document.getElementById("status").textContent = "query: " + answer.query + " (" + answer.hits.length + " hits)";
  const box = document.getElementById("hits");
  box.innerHTML = "";
  for (const hit of answer.hits) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.dataset.row = hit.row;
    fig.dataset.path = hit.path;
    fig.title = "search by this image";
    const img = document.createElement("img");
    img.src = "/thumb/" + hit.row;
    img.alt = hit.path;
    const cap = document.createElement("figcaption");
    cap.textContent = "#" + hit.rank + "  " + hit.score.toFixed(4) + "  " + hit.path.split("/").pop();
    fig.append(img, cap);
    fig.addEventListener("click", () => run(fetch("/search?row=" + hit.row + "&top_k=" + topK)));
    box.append(fig);
  }
}
async function run(request) {
  const response = await request;
  const answer = await response.json();
  if (!response.ok) { document.getElementById("error").textContent = answer.error; return; }
  show(answer);
}
document.getElementById("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = document.getElementById("q").value;
  run(fetch("/search?q=" + encodeURIComponent(q) + "&top_k=" + topK));
});
document.getElementById("image-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = document.getElementById("image").files[0];
  if (!file) { document.getElementById("error").textContent = "choose an image first"; return; }
  const body = new FormData();
  body.append("image", file);
  body.append("top_k", topK);
  run(fetch("/search", {method: "POST", body: body}));
});
</script></body></html>
"""

"""The web app of ``nda-ann serve`` (FastAPI): routes over an ``AttributionService``.

POST /attribute (multipart: files in ``image``; ``timestep`` repeatable, ``topk``, ``candidates``,
``top``), GET /health, GET /info, GET / (the page), and the PNGs the answers link to:
/heatmap/{request}/{query}/{image_id}.png, /query/{request}/{query}.png, /image/{image_id}.png.
Every refusal is JSON {"error": message} with a 4xx status (503 when the queue is full).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import NdaError
from .config import ServeConfig
from .limits import BodyLimit
from .page import PAGE
from .service import AttributionService
from .uploads import RequestError, decode_uploads, parse_params
from .worker import Busy

log = logging.getLogger("nda_ann.serve")
PNG_HEADERS = {"Cache-Control": "private, max-age=3600"}


async def _read_form(request: Request, config: ServeConfig) -> tuple[list[tuple[str | None, bytes]], dict[str, list[str]]]:
    """([(filename, bytes)] of the files in ``image``, {field: [text values]}) of a multipart request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send multipart/form-data with one or more files in the field 'image'")
    try:
        form = await request.form(max_files=config.max_files, max_fields=64, max_part_size=64 << 10)
    except HTTPException as err:
        if "Too many files" in str(err.detail):
            raise RequestError(413, f"too many images; at most {config.max_files} per request") from None
        raise RequestError(400, f"malformed multipart request: {err.detail}") from None
    files, fields = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise RequestError(422, f"files go in the field 'image', not {key!r}")
                files.append((value.filename, await value.read()))
            else:
                fields.setdefault(key, []).append(value)
    finally:
        await form.close()
    return files, fields


def _routes(app: FastAPI, service: AttributionService) -> None:
    config = service.config

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/info")
    async def info() -> dict:
        return service.info()

    @app.post("/attribute")
    async def attribute(request: Request) -> JSONResponse:
        files, fields = await _read_form(request, config)
        params = parse_params(fields, config)
        images, names = await run_in_threadpool(decode_uploads, files, config)
        try:
            future = service.worker.submit(service.attribute, images, names, params)
        except Busy as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": "1"})
        try:
            return JSONResponse(await asyncio.wrap_future(future))
        except (NdaError, ValueError) as err:
            raise RequestError(422, str(err)) from None

    def png(data: bytes | None, missing: str) -> Response:
        if data is None:
            raise RequestError(404, missing)
        return Response(data, media_type="image/png", headers=PNG_HEADERS)

    kept = "(the pictures of recent requests are kept for a while, then dropped: attribute again)"

    @app.get("/heatmap/{request_id}/{query}/{image_id}.png")
    def heatmap(request_id: str, query: int, image_id: int) -> Response:
        return png(service.heatmap_png(request_id, query, image_id) if query >= 0 else None, f"no heatmap of image {image_id} for query {query} of request {request_id} {kept}")

    @app.get("/query/{request_id}/{query}.png")
    def query_image(request_id: str, query: int) -> Response:
        return png(service.query_png(request_id, query), f"no query {query} of request {request_id} {kept}")

    @app.get("/image/{image_id}.png")
    def training_image(image_id: int) -> Response:
        return png(service.training_png(image_id), f"no training image {image_id}: the index holds images 0..{service.corpus.count - 1}")


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"error": msg}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)


def create_app(index: str | Path | None = None, config: ServeConfig | None = None, *, device: str = "auto",
               service: AttributionService | None = None) -> FastAPI:
    """The app serving ``index`` (or an already opened ``service``); its worker stops on shutdown."""
    if service is None:
        if index is None:
            raise ValueError("give an index or a service")
        service = AttributionService(index, config, device=device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="nda-ann", summary="Which training images a generated image draws on", lifespan=lifespan)
    app.state.service = service
    _handlers(app)
    _routes(app, service)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    return app

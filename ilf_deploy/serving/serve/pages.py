"""The server's pages for people: Swagger UI at /docs and the playground at /, every asset served
from this package and fastapi-offline's (no CDN: air-gapped browsers get the whole page).

The pages and their assets hold no secret and need no API key; what they call (/openapi.json,
/v1/...) does, so with keys the playground asks for one and sends it as the API's clients do."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).with_name("static")
DOCS = "/docs"
ASSETS = "/static/"  # + a file name: this package's and Swagger UI's files
PAGES = frozenset({"/", DOCS})


def swagger_assets() -> Path | None:
    """Swagger UI's files (fastapi-offline ships Swagger UI 5, which renders OpenAPI 3.1)."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    return Path(fastapi_offline.__file__).with_name("static")


def is_open(path: str) -> bool:
    """Whether `path` is one of the key-less pages or assets."""
    return path in PAGES or path.startswith(ASSETS)


def add_pages(app: FastAPI, title: str) -> None:
    swagger = swagger_assets()
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    if swagger is not None:
        files.update(
            {name: swagger / name for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")}
        )

    async def asset(name: str) -> FileResponse:
        from ilf_deploy.serving.serve.schema import ApiError

        if name not in files:
            raise ApiError(404, f"no such file: {name[:100]}", param="name")
        return FileResponse(files[name], headers={"Cache-Control": "public, max-age=3600"})

    async def docs() -> HTMLResponse:
        if swagger is None:
            message = "Swagger UI needs fastapi-offline: pip install 'ilf-deploy[serve]'"
            return HTMLResponse(f"<p>{message}; the API's description is at /openapi.json</p>", 503)
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - API",
            swagger_js_url=ASSETS + "swagger-ui-bundle.js",
            swagger_css_url=ASSETS + "swagger-ui.css",
            swagger_favicon_url=ASSETS + "favicon.png",
        )

    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route(ASSETS + "{name}", asset, methods=["GET"], include_in_schema=False)
    app.add_api_route(DOCS, docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/", playground, methods=["GET"], include_in_schema=False)

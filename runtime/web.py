"""The page at `/` of `loraflow serve`: chat with the model in a chosen fusion mode and see the
answer's tokens coloured by the gate's weights (runtime/static: plain HTML, JavaScript and CSS,
no build step, nothing fetched from elsewhere, so it works offline).

    add_page(app)    GET / (the page) and GET /static/<file> (its script and style sheet)

The page itself only uses the HTTP API: GET /v1/models and POST /v1/chat/completions with
stream, flow_mode, flow_weights and flow_trace (docs/SERVING.md, "The page").
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().with_name("static")


def add_page(app):
    """Serve the page on `app` (a FastAPI app from server.create_app): GET / and /static/.
    Idempotent: an app that already routes `/` is returned unchanged."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    if any(getattr(r, "path", None) in ("/", "/static") for r in app.router.routes):
        return app
    index = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app

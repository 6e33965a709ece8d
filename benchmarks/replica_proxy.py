"""A minimal round-robin reverse proxy for trying replicas on one machine (not for production:
use nginx, HAProxy, Envoy or your cloud's load balancer there).

    FTN_BACKENDS=http://127.0.0.1:8001,http://127.0.0.1:8002 \
        python -m uvicorn --app-dir benchmarks replica_proxy:app --port 8000

Every request goes to the next backend; the reply carries ``x-backend`` naming it.
"""

from __future__ import annotations

import itertools
import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BACKENDS = [b.strip() for b in os.environ.get("FTN_BACKENDS", "").split(",") if b.strip()]
_next = itertools.cycle(range(max(len(BACKENDS), 1)))
_client = httpx.AsyncClient(timeout=120)
_HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


async def forward(request: Request) -> Response:
    if not BACKENDS:
        return Response('{"error": "no backends: set FTN_BACKENDS"}', 503, media_type="application/json")
    backend = BACKENDS[next(_next)]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    try:
        r = await _client.request(request.method, backend + request.url.path, params=request.query_params,
                                  content=await request.body(), headers=headers)
    except httpx.HTTPError as exc:
        return Response(f'{{"error": "backend {backend} failed: {type(exc).__name__}"}}', 502,
                        media_type="application/json")
    out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
    out["x-backend"] = backend
    return Response(r.content, r.status_code, headers=out)


app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE"])])

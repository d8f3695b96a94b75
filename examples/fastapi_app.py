"""An example web app in front of memq: ``POST /retrieve`` and ``POST /memories``.

    MEMQ_BROKER_URL=redis://... MEMQ_RESULT_BACKEND=redis://... \\
        uvicorn --app-dir examples fastapi_app:app --port 8000

It awaits ``aretrieve``/``aremember``: the wait for the workers runs on memq's client thread pool, so
the event loop keeps serving other requests meanwhile. The app imports no torch and no pymongo; the
model and the database live in the workers.

Errors: invalid input → 422 with the field; the fleet not answering in time → 504; Redis or a worker
dependency down → 503; a task that failed → 502.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from memq import aremember, aretrieve
from memq.errors import InvalidInput, MemqError, RetrievalTimeout, TaskFailed, TransientError

app = FastAPI(title="memq example", version="1")


class RetrieveBody(BaseModel):
    query: str
    memory_id: str
    limits: dict[str, int]
    weights: dict[str, float] | None = None
    timeout_s: float | None = None


class MemoriesBody(BaseModel):
    memory_id: str
    type: str
    items: list[dict[str, Any] | str] = Field(min_length=1)


@app.post("/retrieve")
async def retrieve(body: RetrieveBody) -> dict[str, Any]:
    return await aretrieve(body.query, body.memory_id, body.limits, weights=body.weights, timeout_s=body.timeout_s)


@app.post("/memories", status_code=201)
async def memories(body: MemoriesBody) -> dict[str, Any]:
    return await aremember(body.memory_id, body.type, body.items)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Answers from the event loop alone: it stays fast while retrievals are in flight."""
    return {"status": "ok"}


@app.exception_handler(InvalidInput)
async def invalid_input(_: Any, exc: InvalidInput) -> JSONResponse:
    return JSONResponse(status_code=422, content={"error": "invalid_input", **exc.to_dict()})


@app.exception_handler(MemqError)
async def memq_error(_: Any, exc: MemqError) -> JSONResponse:
    return JSONResponse(status_code=status_for(exc), content={"error": type(exc).__name__, "message": str(exc)})


def status_for(exc: MemqError) -> int:
    if isinstance(exc, RetrievalTimeout):
        return 504
    if isinstance(exc, TransientError):
        return 503
    if isinstance(exc, TaskFailed):
        return 502
    return 500

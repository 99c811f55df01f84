"""Stream uploads (see ``generator_server/stream.py``): begin, then the body on the stream port, then commit
or abort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from generator_server.auth import require_api_key
from generator_server.errors import ApiError
from generator_server.routes import Engine
from generator_server.schemas import (
    StreamBeginRequest,
    StreamBeginResponse,
    StreamCommitRequest,
    WeightsUpdate,
)
from generator_server.stream import StreamReceiver

router = APIRouter(prefix="/weights/stream", dependencies=[Depends(require_api_key)], tags=["weights"])
ERRORS = {
    400: {
        "description": "refused: no stream port, a malformed digest, a body that ended early or ran "
        "long, or does not match its digest or the served model"
    },  # fmt: skip
    404: {"description": "no such open session"},
    408: {"description": "nothing arrived on the stream for --transfer-timeout seconds"},
    409: {"description": "stale version, or the session was aborted"},
    413: {"description": "more bytes than --max-upload-bytes"},
    507: {"description": "no room to stage the upload"},
}


def get_receiver(request: Request, engine: Engine) -> StreamReceiver:
    receiver = getattr(request.app.state, "stream_receiver", None)
    if receiver is None or receiver.engine is not engine:
        raise ApiError(
            400, f"this server takes no stream uploads (its stream port is off: --stream-port off, or TLS "
            f"with --ssl-certfile); it accepts {engine.transports}: use PUT /weights",
        )  # fmt: skip
    return receiver


Receiver = Annotated[StreamReceiver, Depends(get_receiver)]


@router.post("/begin", response_model=StreamBeginResponse, responses=ERRORS)
async def begin(body: StreamBeginRequest, receiver: Receiver):
    session = receiver.begin(body)
    return StreamBeginResponse(
        session=session.id, ticket=session.ticket.hex(), port=receiver.port, timeout_seconds=receiver.timeout
    )


@router.post("/{session}/commit", response_model=WeightsUpdate, responses=ERRORS)
async def commit(session: str, receiver: Receiver, body: StreamCommitRequest | None = None):
    return await receiver.commit(session, body.blake3 if body is not None else None)


@router.delete("/{session}", responses=ERRORS)
async def abort(session: str, receiver: Receiver):
    await receiver.abort(session)
    return {"aborted": session}

"""CUDA IPC weight transfers (see ``generator_server/ipc.py``): begin, buckets, commit or abort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from generator_server.auth import require_api_key
from generator_server.errors import ApiError
from generator_server.ipc import IpcReceiver
from generator_server.routes import Engine
from generator_server.schemas import (
    IpcBeginRequest,
    IpcBeginResponse,
    IpcBucketRequest,
    IpcBucketResponse,
    WeightsUpdate,
)

router = APIRouter(prefix="/weights/ipc", dependencies=[Depends(require_api_key)], tags=["weights"])
ERRORS = {
    400: {"description": "refused: another host or GPU, a tensor that does not match, a bad handle"},
    404: {"description": "no such open session"},
    409: {"description": "stale version, or the session ended"},
    413: {"description": "body over --max-request-bytes"},
}


def get_receiver(request: Request, engine: Engine) -> IpcReceiver:
    receiver = getattr(request.app.state, "ipc_receiver", None)
    if receiver is None or receiver.engine is not engine:
        receiver = IpcReceiver(engine, request.app.state.settings.transfer_timeout)
        request.app.state.ipc_receiver = receiver
    return receiver


Receiver = Annotated[IpcReceiver, Depends(get_receiver)]


@router.post("/begin", response_model=IpcBeginResponse, responses=ERRORS)
async def begin(body: IpcBeginRequest, receiver: Receiver):
    session = receiver.begin(body)
    return IpcBeginResponse(session=session.id, timeout_seconds=session.timeout)


@router.post("/{session}/bucket", response_model=IpcBucketResponse, responses=ERRORS)
async def bucket(session: str, body: IpcBucketRequest, receiver: Receiver):
    return IpcBucketResponse(tensors_received=await receiver.bucket(session, body))


@router.post("/{session}/commit", response_model=WeightsUpdate, responses=ERRORS)
async def commit(session: str, receiver: Receiver):
    return await receiver.commit(session)


@router.delete("/{session}", responses=ERRORS)
async def abort(session: str, receiver: Receiver):
    await receiver.abort(session)
    return {"aborted": session}


__all__ = ["router", "ApiError"]

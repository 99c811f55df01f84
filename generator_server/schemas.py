"""The bodies of the HTTP contract: defined once, in ``online_dpo_protocol.models`` (the trainer's client
reads the answers with them too); re-exported here for the server's modules."""

from online_dpo_protocol.models import (  # noqa: F401
    EXACTLY_ONE_PROMPT_FORM,
    Completion,
    GenerateRequest,
    GenerateResponse,
    GenerateTiming,
    HealthResponse,
    Int,
    IpcBeginRequest,
    IpcBeginResponse,
    IpcBucketRequest,
    IpcBucketResponse,
    IpcBucketTensor,
    IpcHandle,
    IpcTensor,
    LoadWeightsRequest,
    PromptResult,
    PushTarget,
    StreamBeginRequest,
    StreamBeginResponse,
    StreamCommitRequest,
    TensorSpec,
    WeightsDigest,
    WeightsSpec,
    WeightsUpdate,
)

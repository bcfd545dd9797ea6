"""The encoder's two layouts behind one interface (deployments/encoder_client.py), without a
cluster: through EmbeddingServer's handle, a call whose replica died before answering goes
again and a refusal is raised as Iris's error; in the ingress, an engine that is restarting
is not ready. The app-level proofs: the chaos fault kill_encoder (EmbeddingServer) and
test_embeddings' killed in-ingress encoder."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from deployments.embedding_server import EmbedBatch
from deployments.encoder_client import InProcessEncoder, ServeEncoder
from handlers.errors import EngineUnavailable, InvalidRequest
from tests.fakes import FakeCallHandle, FakeEncoderHost

BATCH = EmbedBatch(["a photo of a cat"])
ANSWER = ([[1.0, 0.0]], 5)


async def test_serve_encoder_sends_the_call_again_when_its_replica_died() -> None:
    handle = FakeCallHandle({"embed": ANSWER}, errors=[ActorDiedError(), ActorDiedError()])
    assert await ServeEncoder(handle).embed(BATCH, deadline=1e12) == ANSWER  # type: ignore[arg-type]
    assert handle.calls == [("embed", (BATCH,))] * 3


async def test_serve_encoder_raises_a_refusal_as_iris_error_without_repeating_it() -> None:
    refused = RayTaskError("EmbeddingServer.embed", "Traceback ...",
                           InvalidRequest("bad", param="input")).as_instanceof_cause()
    handle = FakeCallHandle({"embed": ANSWER}, errors=[refused])
    with pytest.raises(InvalidRequest) as info:
        await ServeEncoder(handle).embed(BATCH, deadline=1e12)  # type: ignore[arg-type]
    assert type(info.value) is InvalidRequest and info.value.param == "input"
    assert len(handle.calls) == 1


async def test_serve_encoder_gives_up_on_a_lost_replica_at_its_deadline() -> None:
    handle = FakeCallHandle({"embed": ANSWER}, errors=[ActorDiedError()] * 3)
    with pytest.raises(EngineUnavailable) as info:
        await ServeEncoder(handle).embed(BATCH, deadline=0)  # type: ignore[arg-type]
    assert info.value.code == "engine_unavailable" and info.value.headers["Retry-After"]
    assert len(handle.calls) == 1


async def test_in_process_encoder_is_not_ready_while_its_engine_restarts() -> None:
    with pytest.raises(EngineUnavailable):
        await InProcessEncoder(FakeEncoderHost(ready=False)).ready()  # type: ignore[arg-type]
    await InProcessEncoder(FakeEncoderHost(ready=True)).ready()  # type: ignore[arg-type]
    assert await InProcessEncoder(FakeEncoderHost(ready=True)).logit_scale() == 100.0  # type: ignore[arg-type]

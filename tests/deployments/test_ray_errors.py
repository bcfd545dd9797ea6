"""Ray's real exception classes map onto the client's errors (no look-alikes)."""

from __future__ import annotations

from ray.exceptions import ActorDiedError, GetTimeoutError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.ray_errors import client_error, unwrap
from handlers.errors import GENERIC_500, ImageTooLarge, InvalidRequest, Overloaded


def remote(cause: BaseException) -> BaseException:
    """What a Serve handle call raises when the replica raised `cause`."""
    return RayTaskError("ImagePreprocessor.prepare", "Traceback ...", cause).as_instanceof_cause()


def test_a_remote_client_error_keeps_its_class_fields_and_message() -> None:
    msg = "The image is 40000x40000 (1600000000 pixels); the limit is 100000000 pixels."
    wrapped = remote(ImageTooLarge(msg, param="messages[0].content[0].image_url.url"))
    assert isinstance(wrapped, ImageTooLarge)  # Ray's wrapper subclasses the cause's class
    err = client_error(wrapped)
    assert type(err) is ImageTooLarge and err.status == 400 and err.message == msg
    assert err.param == "messages[0].content[0].image_url.url"


def test_a_leaky_remote_error_is_scrubbed_not_crashed_on() -> None:
    err = client_error(remote(InvalidRequest("bad file /srv/iris/handlers/x.py")))
    assert err.status == 400 and "/srv" not in err.message


def test_nested_wrappers_are_unwrapped() -> None:
    inner = InvalidRequest("bad")
    assert unwrap(remote(remote(inner))) is inner


def test_a_remote_unexpected_error_is_a_generic_500() -> None:
    err = client_error(remote(RuntimeError("boom at 0x7f00deadbeef")))
    assert err.status == 500 and err.message == GENERIC_500


def test_serve_backpressure_is_503_with_retry_after() -> None:
    err = client_error(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    assert isinstance(err, Overloaded) and err.headers["Retry-After"] == "1"


def test_ray_get_timeout_is_504() -> None:
    assert client_error(GetTimeoutError("timed out")).status == 504


def test_a_replica_still_gone_when_the_retries_stop_is_a_503_to_retry_not_a_500() -> None:
    for gone in (ActorDiedError(), remote(ActorDiedError())):
        err = client_error(gone)
        assert err.status == 503 and err.code == "service_unavailable"
        assert err.headers["Retry-After"]

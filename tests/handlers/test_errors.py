from __future__ import annotations

import pickle

from handlers.errors import (
    GENERIC_500,
    ImageNotFound,
    InvalidRequest,
    Overloaded,
    error_from_openai_payload,
    to_error,
)


def test_errors_keep_status_and_param_across_pickling() -> None:
    err = ImageNotFound("gone", param="messages[0].content[1].image_url.url")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ImageNotFound
    assert back.status == 400 and back.param == err.param and back.code == "image_not_found"


def test_unwraps_ray_style_cause() -> None:
    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

    assert to_error(Wrapper(InvalidRequest("bad"))).message == "bad"


def test_unknown_exceptions_become_generic_500() -> None:
    err = to_error(RuntimeError("boom at 0x7f00deadbeef in /srv/app/x.py line 3"))
    assert err.status == 500 and err.message == GENERIC_500
    assert err.envelope() == {
        "error": {"message": GENERIC_500, "type": "internal_error", "param": None,
                  "code": "internal_error"}
    }


def test_leaky_client_messages_are_scrubbed() -> None:
    err = to_error(InvalidRequest("failed opening /home/u/secret/model.py"))
    assert "/home" not in err.message and err.status == 400


def test_backpressure_maps_to_503_with_retry_after() -> None:
    class BackPressureError(Exception):
        pass

    err = to_error(BackPressureError("queue full"))
    assert isinstance(err, Overloaded) and err.headers["Retry-After"] == "1"


def test_vllm_payload_mapping() -> None:
    err = error_from_openai_payload(400, {"error": {"message": "bad temp", "param": "temperature"}})
    assert err.status == 400 and err.param == "temperature"
    assert error_from_openai_payload(500, {"message": "/x/y.py"}).message == GENERIC_500

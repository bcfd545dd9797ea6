from __future__ import annotations

import pickle

from handlers.errors import (
    GENERIC_500,
    ImageNotFound,
    ImageTooLarge,
    InvalidRequest,
    error_from_openai_payload,
    to_error,
)


def test_errors_keep_status_and_param_across_pickling() -> None:
    err = ImageNotFound("gone", param="messages[0].content[1].image_url.url")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ImageNotFound
    assert back.status == 400 and back.param == err.param and back.code == "image_not_found"


def test_finds_the_iris_error_an_exception_was_raised_from() -> None:
    try:
        try:
            raise InvalidRequest("bad", param="messages")
        except InvalidRequest as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        err = to_error(outer)
    assert err.message == "bad" and err.param == "messages"


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
    assert err.message.startswith("failed opening")  # still says what went wrong


def test_image_sizes_are_not_mistaken_for_memory_addresses() -> None:
    msg = "The image is 40000x40000 (1600000000 pixels); the limit is 100000000 pixels."
    assert to_error(ImageTooLarge(msg)).message == msg
    assert "0x7f" not in to_error(InvalidRequest("object at 0x7f00deadbeef")).message


def test_vllm_payload_mapping() -> None:
    err = error_from_openai_payload(400, {"error": {"message": "bad temp", "param": "temperature"}})
    assert err.status == 400 and err.param == "temperature"
    assert error_from_openai_payload(500, {"message": "/x/y.py"}).message == GENERIC_500

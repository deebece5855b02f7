"""The batch wire format and the response decision table (agent.wire), without sockets."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import wire
from agent.wire import Action

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, tz=timezone.utc), usegmt=True)


# -- body ------------------------------------------------------------------------------------


def test_batch_body_concatenates_stored_payloads_into_valid_json() -> None:
    payloads = [
        json.dumps({"name": "customers/events", "data": {"i": i}}, separators=(",", ":")).encode()
        for i in range(3)
    ]
    body = wire.batch_body(payloads)
    assert body.startswith(b'{"commands":[')
    assert json.loads(body) == {"commands": [json.loads(p) for p in payloads]}


@pytest.mark.parametrize("count", [0, 51])
def test_batch_body_refuses_empty_and_oversized_batches(count: int) -> None:
    with pytest.raises(ValueError):
        wire.batch_body([b"{}"] * count)


@pytest.mark.parametrize(
    ("configured", "header"),
    [
        ("abc123", "Token abc123"),
        ("Token abc123", "Token abc123"),  # as the SDK documentation writes it
        ("Bearer eyJhbGciOi", "Bearer eyJhbGciOi"),
        ("Tokenabc", "Token Tokenabc"),  # only the word and a space count
        ("token abc", "Token token abc"),
    ],
)
def test_authorization_header_is_never_prefixed_twice(configured: str, header: str) -> None:
    assert wire.authorization_header(configured) == header


def test_batch_path_percent_encodes_the_token() -> None:
    assert wire.batch_path("abc-123") == "/track/v2/projects/abc-123/batch"
    assert wire.batch_path("a/../b?x") == "/track/v2/projects/a%2F..%2Fb%3Fx/batch"


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("100000", 900.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after_seconds_and_garbage(header: str | None, expected: float | None) -> None:
    assert wire.parse_retry_after(header, NOW) == expected


def test_retry_after_http_date_is_relative_to_now() -> None:
    assert wire.parse_retry_after(http_date(NOW + 42), NOW) == pytest.approx(42.0)


def test_retry_after_http_date_in_the_past_means_now() -> None:
    assert wire.parse_retry_after(http_date(NOW - 3600), NOW) == 0.0


def test_retry_after_http_date_far_ahead_is_clamped() -> None:
    assert wire.parse_retry_after(http_date(NOW + 86400), NOW) == wire.MAX_RETRY_AFTER


def test_retry_after_obsolete_date_forms_are_accepted() -> None:
    # RFC 850 and asctime forms are still legal for recipients to parse.
    assert wire.parse_retry_after("Tuesday, 14-Nov-23 22:13:30 GMT", NOW) == pytest.approx(10.0)
    assert wire.parse_retry_after("Tue Nov 14 22:13:30 2023", NOW) == pytest.approx(10.0)


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_stays_in_range(header: str) -> None:
    value = wire.parse_retry_after(header, NOW)
    assert value is None or 0.0 <= value <= wire.MAX_RETRY_AFTER


# -- classification --------------------------------------------------------------------------


def ok_body(*successes: bool, error: str = "bad") -> bytes:
    results = [{"success": True} if s else {"success": False, "errors": [error]} for s in successes]
    return json.dumps(
        {"success": True, "start_time": 1.0, "end_time": 2.0, "results": results}
    ).encode()


def test_200_gives_per_command_results_in_order() -> None:
    verdict = wire.classify(200, ok_body(True, False, True, error="Invalid timestamp"), 3)
    assert verdict.action is Action.OK
    assert [r.success for r in verdict.results] == [True, False, True]
    assert verdict.results[1].error == "Invalid timestamp"
    assert verdict.accepted == 2


def test_200_error_objects_are_flattened_to_text() -> None:
    body = json.dumps({"success": True, "results": [{"success": False, "errors": [{"f": "x"}]}]})
    verdict = wire.classify(200, body.encode(), 1)
    assert verdict.results[0].error == '{"f": "x"}'


def test_200_refusal_without_errors_still_has_a_reason() -> None:
    body = json.dumps({"success": True, "results": [{"success": False}]}).encode()
    assert wire.classify(200, body, 1).results[0].error


def test_200_error_text_is_bounded() -> None:
    body = ok_body(False, error="x" * 100_000)
    assert len(wire.classify(200, body, 1).results[0].error) == wire.MAX_ERROR_TEXT


@pytest.mark.parametrize(
    "body",
    [
        b"<html>captive portal</html>",
        b"[]",
        json.dumps({"success": True}).encode(),
        json.dumps({"success": True, "results": [{"success": True}]}).encode(),  # 1 for 2 sent
    ],
)
def test_200_without_a_usable_result_list_is_retried_never_acked(body: bytes) -> None:
    assert wire.classify(200, body, 2).action is Action.RETRY


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599, 408, 429])
def test_transient_statuses_retry(status: int) -> None:
    verdict = wire.classify(status, b"", 5, retry_after="7", now=NOW)
    assert verdict.action is Action.RETRY
    assert verdict.retry_after == 7.0
    assert str(status) in verdict.reason


def test_retry_without_header_has_no_retry_after() -> None:
    assert wire.classify(503, b"", 1).retry_after is None


def test_429_with_http_date_retry_after() -> None:
    verdict = wire.classify(429, b"", 1, retry_after=http_date(NOW + 30), now=NOW)
    assert verdict.retry_after == pytest.approx(30.0)


@pytest.mark.parametrize("status", [401, 403, 404, 405, 410])
def test_credential_and_url_errors_pause(status: int) -> None:
    body = json.dumps({"success": False, "error": "Could not authenticate"}).encode()
    verdict = wire.classify(status, body, 3)
    assert verdict.action is Action.PAUSE
    assert str(status) in verdict.reason


@pytest.mark.parametrize(
    "body",
    [
        {"success": False, "error": "Could not authenticate"},
        {"success": False, "error": "Invalid project id"},
        {"success": False, "errors": ["invalid PROJECT ID given"]},
    ],
)
def test_400_about_credentials_pauses_instead_of_splitting(body: dict[str, object]) -> None:
    verdict = wire.classify(400, json.dumps(body).encode(), 50)
    assert verdict.action is Action.PAUSE
    assert "400" in verdict.reason


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"success": false, "message": "Invalid JSON"}'),
        (400, b"bad request"),
        (413, b""),
        (422, b'{"errors": ["x"]}'),
        (200, b'{"success": false, "message": "No commands"}'),
    ],
)
def test_other_whole_batch_refusals_split(status: int, body: bytes) -> None:
    verdict = wire.classify(status, body, 10)
    assert verdict.action is Action.SPLIT


def test_reasons_carry_the_apis_message_but_bounded() -> None:
    verdict = wire.classify(400, json.dumps({"message": "m" * 5000}).encode(), 2)
    assert verdict.reason.startswith("HTTP 400: mmm")
    assert len(verdict.reason) < 300


def test_the_apis_text_is_one_line_even_when_it_echoes_a_client() -> None:
    """The API may echo an event name an app chose; the reason goes into log lines."""
    hostile = "bad event type tap\x1b[2J\r\nFORGED line\u2028"
    verdict = wire.classify(200, ok_body(False, error=hostile), 1)
    assert verdict.results[0].error == "bad event type tap\\x1b[2J\\x0d\\x0aFORGED line\\u2028"
    for body in (json.dumps({"error": hostile}).encode(), hostile.encode()):
        reason = wire.classify(400, body, 2).reason
        assert reason.startswith("HTTP 400: bad event type tap\\x1b[2J"), reason
        assert not any(ch in reason for ch in "\x1b\r\n\u2028"), reason


def test_redirects_pause_with_a_hint() -> None:
    verdict = wire.classify(301, b"", 1)
    assert verdict.action is Action.PAUSE
    assert "base_url" in verdict.reason


def test_nonsense_status_retries() -> None:
    assert wire.classify(999, b"", 1).action is Action.RETRY

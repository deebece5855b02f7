"""The API stand-in answers like the Engagement API and misbehaves on request.

Its fidelity is what the sync tests rest on, so the shapes here follow REFERENCE.md's
"Engagement Tracking API" section.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from agent_devtools.apistub import ApiStub, Fault, Match, RateLimit

BATCH = "/track/v2/projects/proj-a/batch"
BATCH_B = "/track/v2/projects/proj-b/batch"
AUTH = {"Authorization": "Token key-a", "Content-Type": "application/json"}


def command(event_type: str = "test", **properties: Any) -> dict[str, Any]:
    return {
        "name": "customers/events",
        "data": {
            "customer_ids": {"cookie": "c"},
            "event_type": event_type,
            "timestamp": 1_700_000_000.5,
            "properties": properties,
        },
    }


@pytest.fixture
def pool(api_stub: ApiStub) -> Iterator[urllib3.HTTPConnectionPool]:
    with urllib3.HTTPConnectionPool("127.0.0.1", api_stub.port, retries=False) as p:
        yield p


def post(
    pool: urllib3.HTTPConnectionPool,
    body: Any,
    *,
    path: str = BATCH,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, urllib3.BaseHTTPResponse]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = pool.urlopen("POST", path, body=raw, headers=headers or AUTH)
    return response.status, json.loads(response.data), response


def test_accepts_a_batch_and_records_it(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    customer = {
        "name": "customers",
        "data": {
            "customer_ids": {"registered": "x"},
            "properties": {"a": 1},
            "update_timestamp": 2.0,
        },
    }
    status, body, _ = post(pool, {"commands": [command(n=1), customer]})
    assert status == 200
    assert body["success"] is True
    assert body["results"] == [{"success": True}, {"success": True}]
    assert body["start_time"] <= body["end_time"]
    received = api_stub.received("proj-a")
    assert [r.name for r in received] == ["customers/events", "customers"]
    assert received[0].data["properties"] == {"n": 1}
    assert api_stub.requests()[0].commands == 2


def test_malformed_commands_fail_individually(pool: urllib3.HTTPConnectionPool) -> None:
    bad_event = {"name": "customers/events", "data": {"customer_ids": {}, "timestamp": "x"}}
    status, body, _ = post(pool, {"commands": [bad_event, command(), {"name": "nope"}]})
    assert status == 200
    first, second, third = body["results"]
    assert first["success"] is False and len(first["errors"]) >= 2
    assert second == {"success": True}
    assert third["success"] is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "Invalid JSON"),
        (b'{"commands": [{"x": NaN}]}', "Invalid JSON"),
        (b"{}", "No commands"),
        (b'{"commands": []}', "No commands"),
    ],
)
def test_whole_batch_refusals(pool: urllib3.HTTPConnectionPool, body: bytes, message: str) -> None:
    status, parsed, _ = post(pool, body)
    assert status == 400
    assert parsed == {"success": False, "message": message}


def test_more_than_50_commands_is_a_400(pool: urllib3.HTTPConnectionPool) -> None:
    status, body, _ = post(pool, {"commands": [command()] * 51})
    assert status == 400 and body["success"] is False


def test_auth_and_unknown_project(pool: urllib3.HTTPConnectionPool) -> None:
    status, body, _ = post(pool, {"commands": [command()]}, headers={"Authorization": "Token x"})
    assert (status, body) == (401, {"success": False, "error": "Could not authenticate"})
    status, body, _ = post(pool, {"commands": [command()]}, path="/track/v2/projects/zz/batch")
    assert (status, body) == (400, {"success": False, "error": "Invalid project id"})


def test_open_mode_accepts_any_project() -> None:
    with ApiStub() as stub, urllib3.HTTPConnectionPool("127.0.0.1", stub.port) as p:
        status, _, _ = post(
            p,
            {"commands": [command()]},
            path="/track/v2/projects/any/batch",
            headers={"Authorization": "Token whatever"},
        )
        assert status == 200
        assert len(stub.received("any")) == 1


def test_system_time(pool: urllib3.HTTPConnectionPool) -> None:
    response = pool.urlopen("GET", "/track/v2/projects/proj-a/system/time", headers=AUTH)
    assert response.status == 200
    assert abs(json.loads(response.data)["time"] - time.time()) < 60


def test_clock_offset_moves_system_time_the_batch_command_and_the_date_header(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.set_clock_offset(-86_400.0)  # a day behind
    response = pool.urlopen("GET", "/track/v2/projects/proj-a/system/time", headers=AUTH)
    assert abs(json.loads(response.data)["time"] - (time.time() - 86_400)) < 60
    date = parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(date - (time.time() - 86_400)) < 60
    status, body, batch = post(pool, {"commands": [{"name": "system/time", "data": {}}]})
    assert status == 200 and abs(body["results"][0]["time"] - (time.time() - 86_400)) < 60
    assert abs(parsedate_to_datetime(batch.headers["Date"]).timestamp() - date) < 60
    missing = pool.urlopen("GET", "/nowhere")
    assert abs(parsedate_to_datetime(missing.headers["Date"]).timestamp() - date) < 60


def test_system_time_is_authorized_like_tracking(pool: urllib3.HTTPConnectionPool) -> None:
    response = pool.urlopen(
        "GET", "/track/v2/projects/proj-a/system/time", headers={"Authorization": "Token bad"}
    )
    assert response.status == 401


def test_rate_limit_answers_429_with_retry_after_per_client(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.set_rate_limit(RateLimit(per_second=2))
    statuses = [post(pool, {"commands": [command()]})[0] for _ in range(6)]
    assert statuses[:2] == [200, 200] and 429 in statuses  # a burst of one second's worth
    refused = [r for r in api_stub.requests() if r.status == 429]
    assert refused and all(r.commands == 1 for r in refused)
    too_many = pool.urlopen("GET", "/track/v2/projects/proj-a/system/time", headers=AUTH)
    assert too_many.status == 429 and int(too_many.headers["Retry-After"]) >= 1
    accepted = len(api_stub.received())
    api_stub.set_rate_limit(None)
    assert post(pool, {"commands": [command()]})[0] == 200
    assert len(api_stub.received()) == accepted + 1


def test_rate_limit_by_project_counts_each_project_alone(api_stub: ApiStub) -> None:
    api_stub.apply_control({"rate_limit": {"per_second": 1, "by": "project"}})
    with urllib3.HTTPConnectionPool("127.0.0.1", api_stub.port, retries=False) as p:
        assert post(p, {"commands": [command()]})[0] == 200
        assert post(p, {"commands": [command()]})[0] == 429
        other = {"Authorization": "Token key-b"}
        assert post(p, {"commands": [command()]}, path=BATCH_B, headers=other)[0] == 200
    with pytest.raises(ValueError):
        api_stub.apply_control({"rate_limit": {"per_second": 0}})


def test_black_hole_accepts_and_never_answers(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.black_hole_next(1)
    with pytest.raises(ReadTimeoutError):
        pool.urlopen(
            "POST", BATCH, body=json.dumps({"commands": [command()]}), headers=AUTH, timeout=0.3
        )
    assert api_stub.received() == []
    assert [r.status for r in api_stub.requests()] == [0]
    api_stub.release_hangs()  # ends the silence by closing the connection, still no answer
    assert api_stub.wait_for(lambda: api_stub.active_requests == 0, 5)


def test_trickle_sends_the_answer_one_byte_at_a_time(api_stub: ApiStub) -> None:
    api_stub.trickle_next(1, 0.05)
    with socket.create_connection(("127.0.0.1", api_stub.port), timeout=5) as conn:
        body = json.dumps({"commands": [command()]}).encode()
        conn.sendall(
            f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: Token key-a\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        first = conn.recv(100)
        second = conn.recv(100)
        assert (first, second) == (b"H", b"T")  # one byte per write
    api_stub.release_hangs()


def test_status_faults_with_retry_after_then_normal(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.fail_next(2, 429, retry_after=3)
    for _ in range(2):
        status, _, response = post(pool, {"commands": [command()]})
        assert status == 429
        assert response.headers["Retry-After"] == "3"
    assert post(pool, {"commands": [command()]})[0] == 200
    assert len(api_stub.received()) == 1
    assert [r.status for r in api_stub.requests()] == [429, 429, 200]


def test_fault_limited_to_a_project(api_stub: ApiStub, pool: urllib3.HTTPConnectionPool) -> None:
    api_stub.add_project("proj-b", "key-b")
    api_stub.fail_next(None, 503, project="proj-b")
    assert post(pool, {"commands": [command()]})[0] == 200
    status, _, _ = post(
        pool,
        {"commands": [command()]},
        path="/track/v2/projects/proj-b/batch",
        headers={"Authorization": "Token key-b"},
    )
    assert status == 503


def test_accepting_fault_records_the_batch_but_fails_the_answer(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.fail_next(1, 500, accept=True)
    assert post(pool, {"commands": [command()]})[0] == 500
    assert len(api_stub.received()) == 1


def test_reset_aborts_the_connection(api_stub: ApiStub, pool: urllib3.HTTPConnectionPool) -> None:
    api_stub.reset_next(1)
    with pytest.raises(ProtocolError):
        post(pool, {"commands": [command()]})
    assert post(pool, {"commands": [command()]})[0] == 200
    assert [r.status for r in api_stub.requests()] == [0, 200]


def test_hang_until_client_timeout(api_stub: ApiStub, pool: urllib3.HTTPConnectionPool) -> None:
    api_stub.hang_next(1, 30)
    with pytest.raises(ReadTimeoutError):
        pool.urlopen(
            "POST", BATCH, body=json.dumps({"commands": [command()]}), headers=AUTH, timeout=0.2
        )
    assert api_stub.active_requests == 1
    api_stub.release_hangs()
    assert api_stub.wait_for(lambda: api_stub.active_requests == 0, 5)


def test_per_command_failures_and_poison(
    api_stub: ApiStub, pool: urllib3.HTTPConnectionPool
) -> None:
    api_stub.fail_commands(Match(event_type="rejected"), "Event type not allowed")
    status, body, _ = post(pool, {"commands": [command(), command("rejected")]})
    assert status == 200
    assert body["results"][1] == {"success": False, "errors": ["Event type not allowed"]}
    api_stub.poison(Match(property="kind", value="poison"))
    assert post(pool, {"commands": [command(kind="fine")]})[0] == 200
    status, body, _ = post(pool, {"commands": [command(), command(kind="poison")]})
    assert status == 400 and body["success"] is False


def test_python_predicates(api_stub: ApiStub, pool: urllib3.HTTPConnectionPool) -> None:
    api_stub.fail_commands(Match(predicate=lambda c: c["data"]["properties"].get("n", 0) > 1))
    _, body, _ = post(pool, {"commands": [command(n=1), command(n=2)]})
    assert [r["success"] for r in body["results"]] == [True, False]


def test_http_control_endpoints(api_stub: ApiStub, pool: urllib3.HTTPConnectionPool) -> None:
    control = {
        "faults": [{"status": 502, "count": 1}],
        "command_failures": [{"match": {"text": "secret"}, "errors": ["nope"]}],
        "poison": [{"event_type": "boom"}],
        "projects": {"proj-c": "key-c"},
    }
    response = pool.urlopen("POST", "/_stub/faults", body=json.dumps(control))
    assert response.status == 200
    assert post(pool, {"commands": [command()]})[0] == 502
    _, body, _ = post(pool, {"commands": [command(x="secret")]})
    assert body["results"][0]["errors"] == ["nope"]
    assert post(pool, {"commands": [command("boom")]})[0] == 400
    status, _, _ = post(
        pool,
        {"commands": [command()]},
        path="/track/v2/projects/proj-c/batch",
        headers={"Authorization": "Token key-c"},
    )
    assert status == 200
    recorded = json.loads(pool.urlopen("GET", "/_stub/received").data)
    assert len(recorded["commands"]) == 1
    assert [r["status"] for r in recorded["requests"]] == [502, 200, 400, 200]
    bad = pool.urlopen("POST", "/_stub/faults", body=b'{"faults": [{"bogus": 1}]}')
    assert bad.status == 400
    assert pool.urlopen("POST", "/_stub/reset", body=b"").status == 200
    assert api_stub.received() == [] and api_stub.requests() == []
    assert post(pool, {"commands": [command("boom")]})[0] == 200  # rules are gone


def test_fault_from_json_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError):
        Fault.from_json({"stauts": 500})
    assert Fault.from_json({"status": 429, "retry_after": 5}).retry_after == "5"


def test_console_script_prints_its_url_and_serves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_devtools.apistub", "--port", "0", "--project", "t:k"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        http = urllib3.PoolManager()
        response = http.request(
            "POST",
            url + "/track/v2/projects/t/batch",
            body=json.dumps({"commands": [command()]}),
            headers={"Authorization": "Token k"},
        )
        assert response.status == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

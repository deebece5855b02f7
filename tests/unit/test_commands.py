"""The one-pass reader (`parse_valid_command`) accepts exactly what the two-step path accepts.

The two-step path (`parse_json` + `validate_command`) gives the error codes and details the
integration tests check (tests/integration/test_socket.py); the fast path must never accept a
command it would refuse, nor refuse one it would accept.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands import (
    MAX_PROPERTIES_DEPTH,
    parse_json,
    parse_valid_command,
    validate_command,
)
from agent.errors import AgentError


def two_step(data: bytes) -> Any:
    """The command, or None where the two-step path raises."""
    try:
        return validate_command(parse_json(data))
    except AgentError:
        return None


def nested(depth: int) -> Any:
    """A value whose innermost container sits at `depth` levels below `properties`."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def event(properties: Any, **fields: Any) -> bytes:
    return json.dumps(
        {"command": "track_event", "name": "e", "properties": properties, **fields}
    ).encode()


CASES = [
    event({"price": 1.5, "items": [{"sku": "a"}]}, app="shop", request_id="r1", timestamp=1.0),
    # `properties` is level 1: containers inside it may reach level 10, not 11.
    event({"k": nested(MAX_PROPERTIES_DEPTH - 2)}),
    event({"k": nested(MAX_PROPERTIES_DEPTH - 1)}),
    event({"k": [[[[[[[[[1]]]]]]]]]}),
    event({"k": [[[[[[[[[[1]]]]]]]]]]}),
    b'{"command":"track_event","name":"e","properties":{"x":NaN}}',
    b'{"command":"track_event","name":"e","properties":{"x":[1,Infinity]}}',
    b'{"command":"track_event","name":"e","properties":{"x":{"y":-1e999}}}',
    b'{"command":"track_event","name":"e","timestamp":1e999}',
    b'{"command":"track_event","name":"e","timestamp":NaN}',
    b'{"command":"track_payment","item":{"value":1e999,"currency":"EUR","payment_system":"",'
    b'"product_id":"","product_title":""}}',
    b'{"command":"identify_customer","ids":{"registered":"a"},"properties":{"x":NaN}}',
    b'{"command":"set_default_properties","properties":{"a":{"b":[1e999]}}}',
    event({}, timestamp=4102444800.5),
    event({}, timestamp=4102444800),
    event({}, timestamp="1"),
    event({}, extra=1),
    event({}, app="defaults"),
    b'{"command":"anonymize","project":"p","mapping":{"track_event":["a",{"project_token":"x"}]}}',
    b'{"command":"anonymize","project":{"project_token":"t","bogus":1}}',
    b'{"command":"flush","wait":1}',
    b'{"command":"status"}',
    b'[{"command":"status"}]',
    b'{"command":"nope"}',
    b"\xff\xfe",
    b'{"command":"track_event","name":"e"',
    b'{"command":"track_event","name":"e","name":"f"}',
]


@pytest.mark.parametrize("data", CASES)
def test_the_fast_path_agrees_with_the_two_step_path(data: bytes) -> None:
    assert parse_valid_command(data) == two_step(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(
    properties=st.dictionaries(st.text(max_size=3), json_values, max_size=4),
    deep=st.integers(0, 12),
)
def test_any_properties_are_judged_alike(properties: dict[str, Any], deep: int) -> None:
    properties["deep"] = nested(deep)
    # json.dumps writes NaN/Infinity literally: both paths must refuse them.
    data = event(properties)
    fast = parse_valid_command(data)
    assert fast == two_step(data)
    if fast is not None:
        assert fast.properties == json.loads(data)["properties"]

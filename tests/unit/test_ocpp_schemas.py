"""The gateway's compiled schema checks against the `ocpp` library's jsonschema validators:
a payload the compiled check passes is one the validator passes (never the other way round),
the chargers' usual payloads take the compiled path, and an invalid payload raises the
validator's own first error (its keyword and path choose the CALLERROR code)."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft4Validator, ValidationError
from ocpp.messages import MessageType, get_validator
from ocpp.v16.enums import Action as Action16
from ocpp.v201.enums import Action as Action201

from evcharging.apps.ev_fleet.ocpp_charger import ChargerModel, Outgoing
from evcharging.apps.ev_ocpp.logic import schema_error_code
from evcharging.apps.ev_ocpp.schemas import compile_schema, fast_check, validate_call

VERSIONS = {"ocpp1.6": "1.6", "ocpp2.0.1": "2.0.1"}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.5, 1.0, -2.0, 1e300])
    | st.text(max_size=6) | st.sampled_from(["Accepted", "Wh", "2026-12-07T09:00:00Z"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["a", "b", "c", "n", "status", "value", "unit"]), inner, max_size=3),
    max_leaves=8,
)


def charger_payloads(protocol: str) -> list[Outgoing]:
    """What the fleet's chargers send in a session (valid: its unit tests say so)."""
    model = ChargerModel("CH-00001", protocol, session_seconds=10.0)
    now = time.monotonic()
    sent = [model.boot(), model.heartbeat(), model.status()]
    model.on_boot({"status": "Accepted", "interval": 30})
    if protocol == "ocpp1.6":
        reply = model.handle("RemoteStartTransaction", {"idTag": "driver-1", "connectorId": 1},
                             now)
        sent += [*reply.then, *model.on_started({"transactionId": 7, "idTagInfo": {
            "status": "Accepted"}}, now)]
    else:
        reply = model.handle("RequestStartTransaction", {
            "idToken": {"idToken": "driver-1", "type": "Central"}, "remoteStartId": 9,
            "evseId": 1}, now)
        sent += list(reply.then)
    sent += [model.meter(now + 1), *model.stop(now + 3, "EVDisconnected")]
    return sent


SAMPLES = [(VERSIONS[p], out.action, out.payload) for p in VERSIONS
           for out in charger_payloads(p)]


def library_verdict(version: str, action: str, payload: Any) -> ValidationError | None:
    try:
        get_validator(MessageType.Call, action, version).validate(payload)
    except ValidationError as exc:
        return exc
    return None


@pytest.mark.parametrize(("version", "action", "payload"), SAMPLES,
                         ids=[f"{v}-{a}" for v, a, _ in SAMPLES])
def test_the_chargers_usual_payloads_take_the_compiled_path(
    version: str, action: str, payload: Any
) -> None:
    assert library_verdict(version, action, payload) is None
    assert fast_check(action, version)(payload)


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
def test_every_call_schema_of_the_library_compiles(version: str) -> None:
    actions = Action16 if version == "1.6" else Action201
    compiled = 0
    for action in actions:
        try:
            check = fast_check(action.value, version)
        except OSError:
            continue  # an action the library has no CALL schema for
        compiled += 1
        assert check({"no such field": True}) is False or library_verdict(
            version, action.value, {"no such field": True}) is None
    assert compiled > 20


def _mutations(payload: Any) -> st.SearchStrategy[Any]:
    """A valid payload with one part replaced, dropped or added."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*path, index))

    walk(payload, ())

    def apply(path: tuple[Any, ...], how: str, value: Any) -> Any:
        changed = copy.deepcopy(payload)
        if not path:
            return value
        parent = changed
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if how == "drop" and isinstance(parent, dict):
            del parent[last]
        elif how == "add" and isinstance(parent, dict):
            parent[f"{last}X"] = value
        elif how == "long" and isinstance(parent[last], str):
            parent[last] = parent[last] * 40
        elif how == "number" and isinstance(parent[last], int | float):
            parent[last] = float(parent[last]) + 0.5
        else:
            parent[last] = value
        return changed

    return st.builds(apply, st.sampled_from(paths),
                     st.sampled_from(["set", "drop", "add", "long", "number"]), JSON)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_the_compiled_check_never_passes_what_the_library_refuses(data: st.DataObject) -> None:
    version, action, payload = data.draw(st.sampled_from(SAMPLES))
    changed = data.draw(_mutations(payload))
    refused = library_verdict(version, action, changed)
    if fast_check(action, version)(changed):
        assert refused is None, (action, changed, refused)
    # Either way validate_call decides as the library does, with its first error.
    try:
        validate_call(action, version, changed)
    except ValidationError as exc:
        assert refused is not None
        assert (exc.validator, list(exc.path), exc.message) == (
            refused.validator, list(refused.path), refused.message)
        assert schema_error_code(str(exc.validator), exc.path, version) == schema_error_code(
            str(refused.validator), refused.path, version)
    else:
        assert refused is None


KEYWORD_SCHEMAS: list[dict[str, Any]] = [
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"type": ["string", "null"]},
    {"enum": ["Accepted", "Rejected"]},
    {"type": "string", "maxLength": 3},
    {"minLength": 2},
    {"minimum": 0, "maximum": 2},
    {"type": "number", "minimum": 0, "exclusiveMinimum": True},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
     "additionalProperties": False},
    {"properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "boolean"}},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
    {"definitions": {"n": {"type": "object", "properties": {
        "n": {"$ref": "#/definitions/n"}, "value": {"type": "integer"}},
        "additionalProperties": False}}, "$ref": "#/definitions/n"},
    {"$ref": "#/definitions/s", "type": "integer",  # Draft 4: the ref alone counts
     "definitions": {"s": {"type": "string"}}},
    {"type": "string", "format": "date-time"},  # no format checker: not checked
]
"""Keywords the compiled check mirrors exactly: it decides as the library does."""

REFUSED_SCHEMAS: list[dict[str, Any]] = [
    {"type": "number", "multipleOf": 0.1},
    {"type": "string", "pattern": "^a"},
    {"anyOf": [{"type": "string"}]},
    {"id": "http://example.com/x", "type": "string"},
    {"$ref": "http://example.com/schema"},
    {"type": "array", "items": [{"type": "string"}], "additionalItems": False},
    {"enum": [1, "a"]},
]
"""Keywords it does not mirror: it passes nothing, the library decides."""


@settings(max_examples=300, deadline=None)
@given(schema=st.sampled_from(KEYWORD_SCHEMAS), value=JSON)
def test_the_keywords_it_knows_decide_as_the_library_does(
    schema: dict[str, Any], value: Any
) -> None:
    assert compile_schema(schema)(value) == Draft4Validator(schema).is_valid(value)


@settings(max_examples=100, deadline=None)
@given(schema=st.sampled_from(REFUSED_SCHEMAS), value=JSON)
def test_keywords_it_does_not_know_pass_nothing(schema: dict[str, Any], value: Any) -> None:
    assert compile_schema(schema)(value) is False


def test_draft_4_types_as_the_library_has_them() -> None:
    integer, number = compile_schema({"type": "integer"}), compile_schema({"type": "number"})
    assert integer(3) and not integer(3.0) and not integer(True)
    assert number(3) and number(2.5) and not number(False) and not number("3")
    assert not Draft4Validator({"type": "integer"}).is_valid(3.0)  # why integer(3.0) fails


def test_the_gateways_own_calls_are_validated_in_the_event_loop() -> None:
    import ocpp.messages

    import evcharging.apps.ev_ocpp.schemas  # noqa: F401 - what sets it

    assert ocpp.messages.ASYNC_VALIDATION is False  # no thread pool hop per CALL

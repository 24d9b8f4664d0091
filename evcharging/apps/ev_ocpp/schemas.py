"""The JSON-schema check of a charger's CALL, fast on the common path (SPEC §8, Errors).

The `ocpp` library's validators (``jsonschema``'s ``Draft4Validator`` of the version's
schema) are exact but slow: at 5,000 chargers they took a fifth of the gateway's event
loop (py-spy). :func:`validate_call` first runs the schema compiled into plain Python
checks (:func:`compile_schema`); a payload they pass is valid. Anything else goes to the
library's validator, which raises the same first error as before (its keyword and path
choose the CALLERROR code), or finds the payload valid after all.

So the compiled check must never pass a payload the validator refuses; it may refuse one
the validator passes (that only costs time). It follows Draft 4 as ``jsonschema`` does
(``$ref`` hides its siblings; ``format`` is not checked, as the library's validators have
no format checker; ``integer`` is an ``int``, not a float) for the keywords the OCPP 1.6
and 2.0.1 schemas use, and refuses whatever it does not know (``multipleOf``,
``pattern``, a ``$ref`` outside the schema's own document, an unknown keyword...), leaving
those payloads to the validator.

Importing this module also makes the library validate the gateway's own CALLs in the event
loop rather than in a thread pool (:data:`ocpp.messages.ASYNC_VALIDATION`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import ocpp.messages
from ocpp.messages import MessageType, get_validator

__all__ = ["Check", "compile_schema", "fast_check", "validate_call"]

ocpp.messages.ASYNC_VALIDATION = False
"""The library validates the gateway's own CALLs and their answers (``ChargePoint.call``)
in the default thread pool. Under the GIL that saves no time: each CALL paid two thread
hops, and the event loop waited for the GIL while a worker validated (py-spy: 5 % of the
loop at 5,000 chargers). They are validated in the event loop instead, by the same
validators, with the same errors."""

Check = Callable[[Any], bool]
"""Whether a value certainly satisfies a schema (False: not known to)."""

_ANNOTATIONS = frozenset({
    "$schema", "$id", "title", "description", "comment", "$comment", "javaType", "default",
    "definitions", "format", "examples",
})
"""Keywords that constrain nothing under Draft 4 without a format checker (``$id`` is not
Draft 4's ``id``, which would move ``$ref``'s base: that one is unknown, so refused)."""
_KNOWN = frozenset({
    "type", "enum", "maxLength", "minLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "properties", "required", "additionalProperties", "items",
    "additionalItems", "minItems", "maxItems",
})


def _never(value: Any) -> bool:
    return False


def _always(value: Any) -> bool:
    return True


_TYPES: dict[str, Check] = {
    "string": lambda v: type(v) is str,
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "integer": lambda v: type(v) is int,  # bool is not (its type is bool), nor 1.0
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: v is True or v is False,
    "null": lambda v: v is None,
}


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]

    def check(value: Any) -> bool:
        for one in checks:  # noqa: SIM110 - a plain loop is the fast one here
            if not one(value):
                return False
        return True

    return check


def _type(kind: object) -> Check:
    if isinstance(kind, str):
        return _TYPES.get(kind, _never)
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        checks = [_TYPES.get(k, _never) for k in kind]
        return lambda v: any(c(v) for c in checks)
    return _never


def _is_number(value: Any) -> bool | None:
    """True for an int or float, False for what is no number to Draft 4 (a bool, a
    string...), None for another kind of number (a Decimal: not known here)."""
    kind = type(value)
    if kind is int or kind is float:
        return True
    if kind in (bool, str, dict, list, type(None)):
        return False
    return None


class _Compiler:
    """Compiles one schema document (its ``$ref`` s point into it)."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, Check] = {}

    def ref(self, pointer: object) -> Check:
        if not isinstance(pointer, str) or not pointer.startswith("#"):
            return _never
        found = self.refs.get(pointer)
        if found is not None:
            return found
        target: Any = self.root
        for part in filter(None, pointer[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                self.refs[pointer] = _never
                return _never
            target = target[part]
        box: list[Check] = []
        self.refs[pointer] = lambda v: box[0](v)  # a schema may refer to itself
        compiled = self.node(target)
        box.append(compiled)
        self.refs[pointer] = compiled
        return compiled

    def node(self, schema: object) -> Check:
        if not isinstance(schema, Mapping):
            return _never  # Draft 4 schemas are objects
        if "$ref" in schema:
            return self.ref(schema["$ref"])  # Draft 4: $ref's siblings are ignored
        if any(k not in _KNOWN and k not in _ANNOTATIONS for k in schema):
            return _never
        checks: list[Check] = []
        if "type" in schema:
            checks.append(_type(schema["type"]))
        if "enum" in schema:
            checks.append(self.enum(schema["enum"]))
        if "maxLength" in schema or "minLength" in schema:
            checks.append(self.length(schema.get("minLength", 0), schema.get("maxLength")))
        if "minimum" in schema or "maximum" in schema:
            checks.append(self.bounds(schema))
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            checks.append(self.obj(schema))
        if any(k in schema for k in ("items", "minItems", "maxItems")):
            checks.append(self.array(schema))
        return _all(checks)

    def enum(self, values: object) -> Check:
        if not isinstance(values, list) or not all(type(v) is str for v in values):
            return _never  # jsonschema's equality of other kinds is not mirrored here
        allowed = frozenset(values)
        return lambda v: type(v) is str and v in allowed

    def length(self, low: object, high: object) -> Check:
        if type(low) is not int or (high is not None and type(high) is not int):
            return _never
        top = high if high is not None else -1

        def check(value: Any) -> bool:
            if type(value) is not str:
                return not isinstance(value, str)  # applies to strings only
            return len(value) >= low and (top < 0 or len(value) <= top)

        return check

    def bounds(self, schema: Mapping[str, Any]) -> Check:
        low, high = schema.get("minimum"), schema.get("maximum")
        if any(b is not None and _is_number(b) is not True for b in (low, high)):
            return _never
        low_open = schema.get("exclusiveMinimum", False)
        high_open = schema.get("exclusiveMaximum", False)
        if not isinstance(low_open, bool) or not isinstance(high_open, bool):
            return _never

        def check(value: Any) -> bool:
            number = _is_number(value)
            if number is None:
                return False
            if not number:
                return True  # applies to numbers only
            if low is not None and (value <= low if low_open else value < low):
                return False
            return not (high is not None and (value >= high if high_open else value > high))

        return check

    def obj(self, schema: Mapping[str, Any]) -> Check:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, Mapping) or not isinstance(required, list) or not all(
                isinstance(name, str) for name in required):
            return _never
        checks = {name: self.node(sub) for name, sub in properties.items()}
        needed = tuple(required)
        extras: Check | None
        if extra is True:
            extras = _always
        elif extra is False:
            extras = None
        elif isinstance(extra, Mapping):
            extras = self.node(extra)
        else:
            return _never

        def check(value: Any) -> bool:
            if type(value) is not dict:
                return not isinstance(value, dict)  # applies to objects only
            for name, item in value.items():
                one = checks.get(name)
                if one is None:
                    if extras is None or not extras(item):
                        return False
                elif not one(item):
                    return False
            for name in needed:  # noqa: SIM110 - a plain loop is the fast one here
                if name not in value:
                    return False
            return True

        return check

    def array(self, schema: Mapping[str, Any]) -> Check:
        items = schema.get("items", {})
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(items, Mapping) or type(low) is not int or (
                high is not None and type(high) is not int):
            return _never  # a list of item schemas (and its additionalItems): not here
        each = self.node(items)
        top = high if high is not None else -1

        def check(value: Any) -> bool:
            if type(value) is not list:
                return not isinstance(value, list)  # applies to arrays only
            if len(value) < low or (top >= 0 and len(value) > top):
                return False
            for item in value:  # noqa: SIM110 - a plain loop is the fast one here
                if not each(item):
                    return False
            return True

        return check


def compile_schema(schema: Mapping[str, Any]) -> Check:
    """`schema` (a whole Draft 4 document) as a :data:`Check`."""
    return _Compiler(schema).node(schema)


@cache
def fast_check(action: str, version: str) -> Check:
    """The compiled check of `action`'s CALL payload in OCPP `version` (``1.6`` or
    ``2.0.1``); OSError when the library has no schema for it."""
    return compile_schema(get_validator(MessageType.Call, action, version).schema)


def validate_call(action: str, version: str, payload: Any) -> None:
    """Check a charger's CALL payload against the version's schema: returns when it is
    valid, else raises the library validator's first ``jsonschema.ValidationError``;
    OSError when the library has no schema for `action`."""
    if fast_check(action, version)(payload):
        return
    get_validator(MessageType.Call, action, version).validate(payload)

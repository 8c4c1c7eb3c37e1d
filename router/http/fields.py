"""Typed reads of a JSON request body, each refusing a wrong type with a 400 that names the field.

Ranges are not checked here: the HTTP adapters copy the values into a GenerateRequest and the
shared `router.validation` checks them, exactly as for gRPC. These checks only make sure the values
fit their protobuf fields (an int32 stays an int32, a float is finite), so nothing a client sends
can raise inside protobuf. `null` reads as absent, as OpenAI's API treats it.
"""

from __future__ import annotations

import json
import math

from router.errors import InvalidArgument

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)
FLOAT32_MAX = 3.4028234663852886e38


def parse_json_object(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument("body", f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {type(data).__name__}")
    return data


def renamed(error: InvalidArgument, field: str) -> InvalidArgument:
    """The same complaint about a field the client knows by another name."""
    return InvalidArgument(field, error.message[len(error.field) + 2:])


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, field: str, bounds: tuple[int, int] = INT32) -> int:
    if not is_int(value):
        raise InvalidArgument(field, f"must be an integer, got {json.dumps(value)[:40]}")
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidArgument(field, f"{value} is out of range [{bounds[0]}, {bounds[1]}]")
    return value


class Body:
    """A JSON object and the path to it (for nested field names such as `stream_options.include_usage`)."""

    def __init__(self, data: dict, prefix: str = ""):
        self.data = data
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str):
        return self.data.get(key)

    def integer(self, key: str, bounds: tuple[int, int] = INT32) -> int | None:
        value = self.data.get(key)
        return None if value is None else check_int(value, self.name(key), bounds)

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not (is_int(value) or isinstance(value, float)):
            raise InvalidArgument(self.name(key), f"must be a number, got {json.dumps(value)[:40]}")
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise InvalidArgument(self.name(key), f"must be a finite number, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool | None = None) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidArgument(self.name(key), f"must be true or false, got {json.dumps(value)[:40]}")
        return value

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(self.name(key), f"must be a string, got {json.dumps(value)[:40]}")
        return value

    def strings(self, key: str) -> list[str]:
        """A string or a list of strings (as `stop` may be); absent: []."""
        value = self.data.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise InvalidArgument(self.name(key), "must be a string or a list of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidArgument(f"{self.name(key)}[{index}]", "must be a string")
        return value

    def integers(self, key: str, bounds: tuple[int, int] = INT64) -> list[int]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise InvalidArgument(self.name(key), "must be a list of integers")
        return [check_int(item, f"{self.name(key)}[{index}]", bounds) for index, item in enumerate(value)]

    def obj(self, key: str) -> "Body | None":
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidArgument(self.name(key), "must be a JSON object")
        return Body(value, f"{self.name(key)}.")

    def refuse_unless(self, key: str, allowed, why: str) -> None:
        """Refuse a field OpenAI defines but this server does not implement, unless absent or `allowed`."""
        value = self.data.get(key)
        if value is not None and value not in allowed:
            raise InvalidArgument(self.name(key), why)

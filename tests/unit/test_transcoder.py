"""The store's transcoder reads back exactly what eventsourcing's own JSONTranscoder reads."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)

from shared.bootstrap import build_app
from shared.settings import Settings
from shared.store.transcoder import FastJSONTranscoder

NOW = datetime(2026, 11, 29, 7, 30, 1, 123456, tzinfo=UTC)


def pair() -> tuple[JSONTranscoder, FastJSONTranscoder]:
    standard, fast = JSONTranscoder(), FastJSONTranscoder()
    for transcoder in (standard, fast):
        for transcoding in (UUIDAsHex(), DatetimeAsISO(), DecimalAsStr()):
            transcoder.register(transcoding)
    return standard, fast


def same(value: Any, other: Any) -> bool:
    """Equal, NaN included (NaN != NaN), and of the same types all the way down."""
    if type(value) is not type(other):
        return False
    if isinstance(value, dict):
        return value.keys() == other.keys() and all(same(value[k], other[k]) for k in value)
    if isinstance(value, list):
        return len(value) == len(other) and all(map(same, value, other))
    if isinstance(value, float) and math.isnan(value):
        return math.isnan(other)
    return bool(value == other)


EVENTS: list[Any] = [
    {"timestamp": NOW, "job_name": "a", "config": {"epochs": 3, "dataset": {"seed": 0}}},
    {"timestamp": NOW, "metrics": {"val_loss": math.nan, "lr": math.inf, "x": -math.inf}},
    {"timestamp": NOW, "nested": {"when": NOW, "ids": [uuid.uuid4(), uuid.uuid4()]}},
    {"timestamp": NOW, "price": Decimal("1.10"), "id": uuid.uuid4()},
    {"text": 'looks like a marker: {"_type_": "uuid_hex", "_data_": "x"}', "é": "ü ✓"},
    {"config": {"_type_": "not a transcoding", "_data_": 1, "third": True}},
    {"timestamp": NOW, "list_of_times": [[NOW], {"deep": [NOW]}]},
    [NOW, {"a": NOW}],
    {"big": 2**70, "small": -(2**63), "float": 1e-320, "exp": 1.5e300, "none": None},
    {},
]


@pytest.mark.parametrize("state", EVENTS, ids=range(len(EVENTS)))
def test_decodes_what_the_standard_transcoder_decodes(state: Any) -> None:
    standard, fast = pair()
    data = standard.encode(state)
    assert fast.encode(state) == data
    assert same(fast.decode(data), standard.decode(data))


def test_floats_read_back_to_the_same_bits() -> None:
    standard, fast = pair()
    rng = random.Random(7)
    values = [rng.uniform(-1e6, 1e6) for _ in range(2000)]
    values += [rng.random() * 10.0 ** rng.randint(-300, 300) for _ in range(2000)]
    data = standard.encode({"timestamp": NOW, "values": values})
    assert fast.decode(data)["values"] == standard.decode(data)["values"] == values


def test_unknown_transcoding_is_refused_as_by_the_standard_one() -> None:
    standard, fast = pair()
    data = b'{"when": {"_type_": "martian_time", "_data_": "x"}}'
    for transcoder in (standard, fast):
        with pytest.raises(TranscodingNotRegisteredError):
            transcoder.decode(data)


def test_what_the_fast_parser_refuses_goes_to_the_standard_one() -> None:
    standard, fast = pair()
    data = b'{"s": "\\ud800 lone surrogate", "when": {"_type_": "datetime_iso", "_data_": "'
    data += NOW.isoformat().encode() + b'"}}'
    assert same(fast.decode(data), standard.decode(data))


def test_the_application_uses_it(tmp_path: Path) -> None:
    app = build_app(Settings(data_dir=tmp_path))
    try:
        assert type(app.mapper.transcoder) is FastJSONTranscoder
    finally:
        app.close()

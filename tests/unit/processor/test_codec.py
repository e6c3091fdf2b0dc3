"""The processor's fast codec means exactly what the model means: every payload decodes to the
reading (or rejection) ``reading_from_dict`` gives, and the validated copy carries ``to_dict``'s
content."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.model import Quality, Reading, Rejection, format_ts, parse_ts
from gateway.processor.codec import _decode_slow, canonical_ts, decode, reading_json

# 1970 .. 2100 in milliseconds, plus a margin either side (out of range is a rejection)
millis = st.integers(-86_400_000, 4_102_444_800_000 + 86_400_000)


@settings(max_examples=500, deadline=None)
@given(ms=st.integers(0, 4_102_444_800_000))
def test_canonical_timestamps_parse_like_parse_ts_and_format_back_to_themselves(ms):
    text = format_ts(ms / 1000)
    assert canonical_ts(text) == parse_ts(text)
    assert format_ts(canonical_ts(text)) == text


@settings(max_examples=500, deadline=None)
@given(us=st.integers(0, 4_102_444_800 * 10**6))
def test_microsecond_timestamps_take_the_fast_path_and_mean_what_parse_ts_says(us):
    text = format_ts(us / 10**6)
    assert canonical_ts(text) == parse_ts(text)
    assert format_ts(canonical_ts(text)) == text


def test_other_timestamp_forms_are_left_to_parse_ts():
    for text in (
        "2026-11-28T06:34:14Z",
        "2026-11-28T06:34:14.123+00:00",
        "2026-11-28T06:34:14.123z",
        "2026-11-28 06:34:14.123Z",
        "2026-11-28T06:34:60.000Z",
        "2026-13-28T06:34:14.123Z",
        "\uff12026-11-28T06:34:14.123Z",  # a fullwidth digit
        "2026-11-28T06:34:1\u0664.123Z",  # an Arabic-Indic digit
        "2026-11-28T06:34:14.1234Z",
        "2026-11-28T06:34:14.12345678Z",
        "2026-11-28T06:34:14.123\u066456Z",
    ):
        assert canonical_ts(text) is None, text


texts = st.one_of(st.text(max_size=5), st.sampled_from(["ph-1", "pH", "north", "", "x" * 257]))
canonical = millis.map(lambda ms: format_ts(ms / 1000) if 0 <= ms <= 4_102_444_800_000 else "x")
# A well-formed reading as our gateway sends it...
valid = st.fixed_dictionaries(
    {
        "sensorId": st.text(min_size=1, max_size=8),
        "parameter": st.sampled_from(["pH", "BOD", "temperature"]),
        "value": st.one_of(
            st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-99, 99)
        ),
        "unit": st.text(max_size=4),
        "quality": st.sampled_from(["good", "uncertain", "bad"]),
        "timestamp": canonical,
        "location": st.text(max_size=4),
        "gatewayId": st.text(max_size=4),
        "seq": st.one_of(st.none(), st.integers(0, 2**63)),
        "qualityReasons": st.lists(st.text(max_size=4), max_size=2),
    },
    optional={"plantId": st.text(min_size=1, max_size=4)},
)
# ...and every field in turn missing or of another shape.
odd_values = st.one_of(
    texts,
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["7.1", "ERR", [], {}, [1], ["a", 2], "GOOD", 1]),
    st.sampled_from(
        ["2026-11-28T06:34:14Z", "2026-11-28T06:34:14.5+01:00", "2026-11-28T06:34:14.123z"]
    ),
)


@st.composite
def payload_dicts(draw):
    d = draw(valid)
    how = draw(st.sampled_from(["as is", "missing", "odd"]))
    if how != "as is":
        key = draw(st.sampled_from([*sorted(valid.wrapped_strategy.mapping), "plantId"]))
        d.pop(key, None)
        if how == "odd":
            d[key] = draw(odd_values)
    return d


def _same(a: Reading | Rejection, b: Reading | Rejection) -> bool:
    if isinstance(a, Reading) and isinstance(b, Reading):
        # NaN never comes out of JSON here, so plain equality is exact
        return a == b and type(a.value) is type(b.value)
    return a == b


@settings(max_examples=1500, deadline=None)
@given(d=payload_dicts())
def test_decoding_gives_what_the_model_gives(d):
    payload = json.dumps(d).encode()
    fast, slow = decode(payload, "north"), _decode_slow(payload, "north")
    if d.get("timestamp") is None and isinstance(fast, Reading) and isinstance(slow, Reading):
        fast.timestamp = slow.timestamp  # both took "now"
    assert _same(fast, slow)


def test_payloads_orjson_refuses_still_decode_like_the_model():
    ts = "2026-11-28T06:34:14.123Z"
    for payload in (
        f'{{"sensorId":"ph-1","parameter":"pH","value":NaN,"timestamp":"{ts}"}}'.encode(),
        f'{{"sensorId":"ph-1","parameter":"pH","value":1e400,"timestamp":"{ts}"}}'.encode(),
        json.dumps({"sensorId": "ph-1", "parameter": "pH", "value": 7, "timestamp": ts}).encode(
            "utf-16"
        ),
        b"\xff\xfe",
        b"",
    ):
        assert _same(decode(payload, "north"), _decode_slow(payload, "north")), payload


def test_a_gateway_reading_round_trips():
    r = Reading("ph-1", "pH", 7.25, "pH", 1_790_000_000.123, "north", "inlet")
    r.gateway_id, r.seq = "gw-1", 42
    r.flag(Quality.UNCERTAIN, "spike")
    assert decode(r.to_json(), "default") == r


readings = st.builds(
    Reading,
    sensor_id=texts,
    parameter=texts,
    value=st.one_of(st.none(), st.floats()),
    unit=texts,
    timestamp=millis.filter(lambda ms: ms >= 0).map(lambda ms: ms / 1000),
    plant_id=texts,
    location=texts,
    quality=st.sampled_from(list(Quality)),
    quality_reasons=st.lists(texts, max_size=2),
    gateway_id=texts,
    seq=st.one_of(st.none(), st.integers(0, 2**63)),
    raw_value=st.one_of(st.none(), st.floats()),
    calibration_id=st.one_of(st.none(), texts),
)


@settings(max_examples=500, deadline=None)
@given(r=readings, keep_text=st.booleans())
def test_the_validated_copy_carries_to_dicts_content(r, keep_text):
    ts_text = format_ts(r.timestamp) if keep_text else ""
    assert orjson.loads(reading_json(r, ts_text)) == json.loads(r.to_json())

"""Query input never becomes Flux: strict checks on plant, parameter and times, fixed Flux texts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.processor.provision import flux_string
from gateway.processor.query import (
    QueryInputError,
    check_parameter,
    check_plant,
    parse_duration,
    parse_time,
)

INJECTIONS = [
    'north") |> drop(columns: ["_value"]) //',
    'north" or r.plant_id != "',
    "north |> yield()",
    '${secrets.get(key: "x")}',
    'north\nimport "sql"',
    "",
    " north",
    "north ",
    "a" * 101,
    "../north",
    "north;drop",
    "-north",
]


@pytest.mark.parametrize("plant", INJECTIONS)
def test_plant_names_with_flux_syntax_are_refused(plant):
    with pytest.raises(QueryInputError, match="invalid plant"):
        check_plant(plant)


@pytest.mark.parametrize("plant", ["north", "plant-7", "wwtp_east.2", "A", "p1f2e3d4-a"])
def test_ordinary_plant_names_pass(plant):
    assert check_plant(plant) == plant


@given(st.text(max_size=120))
def test_whatever_passes_the_plant_check_has_no_flux_syntax(text):
    try:
        check_plant(text)
    except QueryInputError:
        return
    assert not set(text) & set('"\\$(){}|/ \n\t,=<>!+*')


@pytest.mark.parametrize("parameter", ['pH" or true', "pH)", "p H", "1pH", "", "pH\n"])
def test_bad_parameters_are_refused(parameter):
    with pytest.raises(QueryInputError):
        check_parameter(parameter)


@pytest.mark.parametrize("parameter", ["pH", "BOD", "flow_rate", "temperature"])
def test_parameters_pass(parameter):
    assert check_parameter(parameter) == parameter


def test_durations_parse_like_flux():
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("-15m") == -timedelta(minutes=15)
    assert parse_duration("7d") == timedelta(days=7)
    for bad in ["1mo", "h", "1h)", "1 h", "now()", "-1h |> drop()"]:
        with pytest.raises(QueryInputError):
            parse_duration(bad)


def test_times_are_now_relative_or_rfc3339():
    now = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    assert parse_time("now", now=now) == now
    assert parse_time("-1h", now=now) == now - timedelta(hours=1)
    assert parse_time("2026-11-28T05:00:00Z", now=now) == now - timedelta(hours=1)
    for bad in ["yesterday", "2026-11-28T05:00:00", "-1h) |> yield(", "now()"]:
        with pytest.raises(QueryInputError):
            parse_time(bad, now=now)


@pytest.mark.parametrize(
    "value, literal",
    [
        ("sensors", '"sensors"'),
        ('a"b', '"a\\"b"'),
        ("${x}", '"\\${x}"'),
        ("back\\slash", '"back\\\\slash"'),
    ],
)
def test_config_values_in_task_flux_are_escaped_string_literals(value, literal):
    assert flux_string(value) == literal

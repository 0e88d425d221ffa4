"""The ``options`` startup parameter reader and the link-time parameter comparison (varcache)."""

from __future__ import annotations

import pytest

from pgmux.protocol.varcache import ParamSet, StartupOptionsError, iter_startup_options, parse_pg_bool, tracked_names


@pytest.mark.parametrize(("options", "items"), [
    ("-c a=1", [("a", "1")]),
    ("-ca=1  --b=2\t-c   c=3", [("a", "1"), ("b", "2"), ("c", "3")]),
    (r"-c DateStyle=German,\ YMD", [("DateStyle", "German, YMD")]),
    (r"-c t\imezone=\E\u\r\o\pe/Lisbon", [("timezone", "Europe/Lisbon")]),
    (r"-c a=x\\y", [("a", r"x\y")]),
    ("-c a=b=c", [("a", "b=c")]),
    ("-c=", [("", "")]),
    ("", []),
])
def test_startup_options_items(options: str, items: list[tuple[str, str]]) -> None:
    assert list(iter_startup_options(options)) == items


@pytest.mark.parametrize("options", ["-d", "-c a", "-c a=1 ", " ", "-c", "x=1", "-c a=1 -x"])
def test_startup_options_malformed(options: str) -> None:
    with pytest.raises(StartupOptionsError):
        list(iter_startup_options(options))


def test_startup_options_yield_items_before_the_bad_one() -> None:
    it = iter_startup_options("-c a=1 -d")
    assert next(it) == ("a", "1")
    with pytest.raises(StartupOptionsError):
        next(it)


@pytest.mark.parametrize(("value", "meaning"), [
    ("on", True), ("ON", True), ("true", True), ("t", True), ("yes", True), ("y", True), ("1", True),
    ("off", False), ("of", False), ("false", False), ("fa", False), ("no", False), ("n", False), ("0", False),
    ("o", None), ("", None), ("2", None), ("onn", None), ("truex", None),
])
def test_parse_pg_bool(value: str, meaning: bool | None) -> None:
    assert parse_pg_bool(value) is meaning


def test_diff_takes_equivalent_values_from_the_server() -> None:
    tracked = tracked_names(["IntervalStyle"])
    client, server = ParamSet(tracked), ParamSet(tracked)
    for name, value in (("DateStyle", "ISO, MDY"), ("standard_conforming_strings", "on"),
                        ("application_name", "on"), ("TimeZone", "UTC")):
        server.set(name, value)
    for name, value in (("DateStyle", "iso, mdy"), ("standard_conforming_strings", "true"),
                        ("application_name", "true"), ("TimeZone", "Europe/Lisbon")):
        client.set(name, value)
    # application_name is text: "true" is not "on" there
    assert client.diff(server, tracked) == [("application_name", "true"), ("TimeZone", "Europe/Lisbon")]
    assert client.get("DateStyle") == "ISO, MDY" and client.get("standard_conforming_strings") == "on"
    client.adopt(server, ["TimeZone", "IntervalStyle"])  # IntervalStyle: the server holds none
    assert client.get("TimeZone") == "UTC" and client.get("IntervalStyle") is None

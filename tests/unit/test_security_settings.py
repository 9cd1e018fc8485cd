"""HEIMDALL_API_KEYS, HEIMDALL_CORS_ORIGINS and the loopback rule, parsed and refused."""

from __future__ import annotations

import logging

import pytest

from services.api.auth import check_exposure
from shared.security import ConfigurationError, find_key, is_loopback, parse_api_keys
from shared.settings import Settings, load_settings

KEY_A = "a" * 20
KEY_B = "b" * 20


def test_keys_parse_with_names_and_roles_and_never_show_the_key() -> None:
    keys = parse_api_keys(f" frontend:{KEY_A}:operator , grafana:{KEY_B}:viewer ")
    assert [(k.name, k.role, k.can_command) for k in keys] == [
        ("frontend", "operator", True),
        ("grafana", "viewer", False),
    ]
    assert KEY_A not in repr(keys)
    assert find_key(keys, KEY_B) == keys[1] and find_key(keys, KEY_B + "x") is None
    assert parse_api_keys("") == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("frontend", "entry 1 ('frontend') must be NAME:KEY:ROLE"),
        (f"frontend:{KEY_A}", "entry 1 ('frontend') must be NAME:KEY:ROLE"),
        (f"a:{KEY_A}:operator,grafana:{KEY_B}:admin", "entry 2 ('grafana'): the role must be"),
        ("grafana:short:viewer", "entry 1 ('grafana'): the key must be at least 16"),
        (f"bad name:{KEY_A}:viewer", "entry 1 ('?'): the name must be"),
        (f"x:{KEY_A}:viewer,x:{KEY_B}:viewer", "two entries have the same name x"),
        (f"x:{KEY_A}:viewer,y:{KEY_A}:viewer", "two entries have the same key (hidden)"),
    ],
)
def test_a_malformed_entry_is_named_and_its_key_is_not_shown(
    monkeypatch: pytest.MonkeyPatch, raw: str, message: str
) -> None:
    monkeypatch.setenv("HEIMDALL_API_KEYS", raw)
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "HEIMDALL_API_KEYS" in str(error.value) and message in str(error.value)
    assert KEY_A not in str(error.value) and KEY_B not in str(error.value)


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        (
            "https://a.example.org, http://localhost:5173",
            ("https://a.example.org", "http://localhost:5173"),
        ),
        ('["https://a.example.org"]', ("https://a.example.org",)),
        ("", ()),
        ("*", ("*",)),
    ],
)
def test_origins_are_a_list_or_json(
    monkeypatch: pytest.MonkeyPatch, raw: str, origins: tuple[str, ...]
) -> None:
    monkeypatch.setenv("HEIMDALL_CORS_ORIGINS", raw)
    assert load_settings().cors_origins == origins


@pytest.mark.parametrize("raw", ["https://a.example.org/", "a.example.org", '["x"', "[1]"])
def test_a_malformed_origin_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("HEIMDALL_CORS_ORIGINS", raw)
    with pytest.raises(ConfigurationError, match="HEIMDALL_CORS_ORIGINS"):
        load_settings()


def test_a_wildcard_origin_with_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_CORS_ORIGINS", "*")
    monkeypatch.setenv("HEIMDALL_CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ConfigurationError, match=r"'\*' together with"):
        load_settings()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("api.example.org", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_without_keys_only_loopback_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_exposure(Settings(api_host="127.0.0.1", _env_file=None))
    assert "no API keys configured" in caplog.text and "loopback" in caplog.text
    with pytest.raises(ConfigurationError, match=r"refusing to listen on 0\.0\.0\.0"):
        check_exposure(Settings(api_host="0.0.0.0", _env_file=None))
    check_exposure(Settings(api_host="0.0.0.0", api_keys=f"a:{KEY_A}:viewer", _env_file=None))

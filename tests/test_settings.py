from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_listen_on_loopback_port_8000_without_keys() -> None:
    settings = load_settings(None)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert not settings.has_keys
    assert settings.watchdog_interval_ms == 100


def test_keys_are_comma_separated_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_API_KEYS", " key-one , key-two,, ")
    settings = load_settings(None)
    assert settings.data_keys == ["key-one", "key-two"]
    assert "key-one" not in repr(settings)


def test_admin_keys_fall_back_to_data_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_API_KEYS", "data-key")
    assert load_settings(None).control_keys == ["data-key"]
    monkeypatch.setenv("SIDECAR_ADMIN_KEYS", "admin-key")
    settings = load_settings(None)
    assert settings.control_keys == ["admin-key"]
    assert settings.data_keys == ["data-key", "admin-key"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIDECAR_PORT", "eighty"),
        ("SIDECAR_PORT", "70000"),
        ("SIDECAR_LOG_FORMAT", "xml"),
        ("SIDECAR_MAX_BODY_BYTES", "-5"),
        ("SIDECAR_STARTUP_TIMEOUT_S", "sk-notanumber123"),
    ],
)
def test_invalid_value_names_the_setting_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(None)
    message = str(caught.value)
    assert name in message
    assert "\n" not in message
    assert value not in message


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_LOG_LEVEL", "DEBUG")
    assert load_settings(None).log_level == "debug"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "sidecar.example.com"])
def test_public_address_without_keys_is_refused(host: str) -> None:
    with pytest.raises(SettingsError, match=f"refusing to listen on {host} without keys"):
        load_settings(None, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    assert load_settings(None, host=host).host == host


def test_public_address_with_keys_is_allowed() -> None:
    assert load_settings(None, host="0.0.0.0", admin_keys="admin-key").host == "0.0.0.0"


def test_env_file_is_read_and_environment_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("SIDECAR_PORT=9001\nSIDECAR_LOG_LEVEL=warning\nSIDECAR_DRAIN_TIMEOUT_S=3\n")
    assert load_settings(env_file).port == 9001
    monkeypatch.setenv("SIDECAR_PORT", "9002")
    settings = load_settings(env_file)
    assert (settings.port, settings.log_level) == (9002, "warning")
    assert load_settings(env_file, port=9003).port == 9003


@pytest.mark.parametrize("budget", [1, 16 * 1024 * 1024 - 1])
def test_bodies_in_flight_must_leave_room_for_one_body(budget: int) -> None:
    with pytest.raises(SettingsError, match="MAX_BODY_BYTES_IN_FLIGHT: at least SIDECAR_MAX_BODY_BYTES"):
        load_settings(None, max_body_bytes_in_flight=budget)
    assert load_settings(None, max_body_bytes_in_flight=0).max_body_bytes_in_flight == 0  # no limit
    assert load_settings(None, max_body_bytes_in_flight=budget, max_body_bytes=budget).max_body_bytes == budget


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    listed = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    expected = {f"SIDECAR_{name.upper()}" for name in Settings.model_fields}
    assert set(listed) == expected
    assert load_settings(REPO / ".env.example") == load_settings(None)

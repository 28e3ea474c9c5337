import pytest

from scim_pipeline.cli import main
from scim_pipeline.config import ConfigError, settings, write_dotenv


def test_missing_variable_names_it(home):
    with pytest.raises(ConfigError, match="SCALEKIT_ENVIRONMENT_URL is not set"):
        settings().scalekit()


def test_malformed_secret_is_one_clear_line(home, monkeypatch):
    monkeypatch.setenv("SCIM_PIPELINE_APP_SECRET", "not-a-secret")
    with pytest.raises(ConfigError) as info:
        settings().app_secret()
    assert "SCIM_PIPELINE_APP_SECRET" in str(info.value) and "not-a-secret" not in str(info.value)


def test_home_dotenv_fills_unset_variables_and_environment_wins(home, monkeypatch):
    write_dotenv(home / "emulator.env", {
        "SCALEKIT_ENVIRONMENT_URL": "https://localhost:8443",
        "SCALEKIT_CLIENT_ID": "skc_1",
        "SCALEKIT_CLIENT_SECRET": "s3cret",
        "SCALEKIT_WEBHOOK_SECRET": "whsec_YWJj whsec_ZGVm",
    })
    sk = settings().scalekit()
    assert (sk.environment_url, sk.client_id) == ("https://localhost:8443", "skc_1")
    assert "s3cret" not in repr(sk)
    assert settings().webhook_secrets() == ["whsec_YWJj", "whsec_ZGVm"]
    monkeypatch.setenv("SCALEKIT_CLIENT_ID", "skc_env")
    assert settings().scalekit().client_id == "skc_env"


def test_every_subcommand_has_help(capsys):
    for command in ("emulator", "webhooks", "app", "sync", "sql", "changes", "approve", "demo", "dev"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: scim-pipeline " + command in capsys.readouterr().out


@pytest.mark.parametrize("value", ["ten", "0", "-5", "inf"])
def test_a_malformed_warehouse_wait_stops_sync_with_one_line(home, monkeypatch, capsys, value):
    monkeypatch.setenv("SCIM_PIPELINE_WAREHOUSE_WAIT_S", value)
    assert main(["sync"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scim-pipeline sync: configuration error: SCIM_PIPELINE_WAREHOUSE_WAIT_S is malformed: "
                   f"expected a positive number of seconds, got {value!r}"]

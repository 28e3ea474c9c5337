import base64

import pytest

from scim_pipeline.cli import main
from scim_pipeline.config import ConfigError, read_dotenv, settings, write_dotenv

OLD_SECRET = "whsec_" + base64.b64encode(b"old-key-" * 4).decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"new-key-" * 4).decode()


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
        "SCALEKIT_WEBHOOK_SECRET": f"{OLD_SECRET} {NEW_SECRET}",
    })
    sk = settings().scalekit()
    assert (sk.environment_url, sk.client_id) == ("https://localhost:8443", "skc_1")
    assert "s3cret" not in repr(sk)
    assert settings().webhook_secrets() == [OLD_SECRET, NEW_SECRET]
    monkeypatch.setenv("SCALEKIT_CLIENT_ID", "skc_env")
    assert settings().scalekit().client_id == "skc_env"


def test_every_subcommand_has_help(capsys):
    for command in ("emulator", "webhooks", "app", "sync", "sql", "changes", "approve", "demo", "dev"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: scim-pipeline " + command in capsys.readouterr().out


def test_a_sourced_dotenv_file_reaches_the_programs_the_shell_starts(tmp_path):
    import subprocess

    path = tmp_path / "emulator.env"
    write_dotenv(path, {"SCALEKIT_CLIENT_ID": "skc_1", "REQUESTS_CA_BUNDLE": "/some/ca.pem"})
    assert path.stat().st_mode & 0o777 == 0o600
    child = subprocess.run(["bash", "-c", f'. "{path}" && env'], capture_output=True, text=True, check=True)
    assert "SCALEKIT_CLIENT_ID=skc_1" in child.stdout.splitlines()
    assert read_dotenv(path) == {"SCALEKIT_CLIENT_ID": "skc_1", "REQUESTS_CA_BUNDLE": "/some/ca.pem"}


@pytest.mark.parametrize("value, says", [
    ("whsec_AA", "too short"), ("whsec_" + "A" * 31, "too short"), ("whsec_A", "malformed"), ("whsec_", "malformed"),
    ("whsec_abc-def_ghi", "malformed"),  # URL-safe base64: the signer would read another key
])
def test_a_secret_needs_24_bytes_of_key(home, monkeypatch, value, says):
    for name, read in (("SCALEKIT_WEBHOOK_SECRET", lambda: settings().webhook_secrets()),
                       ("SCIM_PIPELINE_APP_SECRET", lambda: settings().app_secret())):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=f"^{name} is {says}") as info:
            read()
        assert "\n" not in str(info.value)
        assert value == "whsec_" or value not in str(info.value)


def test_a_secret_of_24_bytes_is_enough_padded_or_not(home, monkeypatch):
    key = base64.b64encode(b"k" * 24).decode()
    unpadded = "whsec_" + base64.b64encode(b"k" * 25).decode().rstrip("=")
    monkeypatch.setenv("SCALEKIT_WEBHOOK_SECRET", f"whsec_{key} {unpadded}")
    assert settings().webhook_secrets() == [f"whsec_{key}", unpadded]


def test_the_services_generate_secrets_the_settings_accept(home, monkeypatch):
    from scim_pipeline.devstack.demo_app.app import generate_secret
    from scim_pipeline.devstack.emulator.webhooks import new_webhook_secret

    for secret in (new_webhook_secret(), generate_secret()):
        monkeypatch.setenv("SCALEKIT_WEBHOOK_SECRET", secret)
        monkeypatch.setenv("SCIM_PIPELINE_APP_SECRET", secret)
        assert settings().webhook_secrets() == [secret] and settings().app_secret() == secret


@pytest.mark.parametrize("value", ["ten", "0", "-5", "inf"])
def test_a_malformed_warehouse_wait_stops_sync_with_one_line(home, monkeypatch, capsys, value):
    monkeypatch.setenv("SCIM_PIPELINE_WAREHOUSE_WAIT_S", value)
    assert main(["sync"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scim-pipeline sync: configuration error: SCIM_PIPELINE_WAREHOUSE_WAIT_S is malformed: "
                   f"expected a positive number of seconds, got {value!r}"]


def test_the_delivery_protocol_is_changes_unless_set_and_a_bad_one_is_named(home, monkeypatch):
    assert settings().app_protocol() == "changes"
    monkeypatch.setenv("SCIM_PIPELINE_APP_PROTOCOL", "scim3")
    with pytest.raises(ConfigError, match="SCIM_PIPELINE_APP_PROTOCOL is malformed: expected one of changes, scim2"):
        settings().app_protocol()


def test_scim2_settings_take_a_tenant_placeholder_a_token_and_a_tenants_file(home, monkeypatch, tmp_path):
    from scim_pipeline.defs.resources import ApplicationResource
    from scim_pipeline.provisioning.scim2_protocol import Scim2Client

    monkeypatch.setenv("SCIM_PIPELINE_APP_PROTOCOL", "scim2")
    monkeypatch.setenv("SCIM_PIPELINE_APP_URL", "https://app.example.com/scim/v2/{organization_id}")
    monkeypatch.setenv("SCIM_PIPELINE_APP_TOKEN", "general-token")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("org_1:\n  url: https://other.example.com/scim/v2\n  token: own-token\norg_2:\n  token: t2\n")
    monkeypatch.setenv("SCIM_PIPELINE_APP_TENANTS", str(tenants))
    scim2 = settings().scim2()
    assert "general-token" not in repr(scim2) and "own-token" not in repr(scim2)  # secrets are never printed
    with ApplicationResource().client() as client:
        assert isinstance(client, Scim2Client)
        assert client.base_url("org_1") == "https://other.example.com/scim/v2"
        assert client.base_url("org_2") == "https://app.example.com/scim/v2/org_2"
        assert (client._token("org_1"), client._token("org_2"), client._token("org_3")) == (
            "own-token", "t2", "general-token")


@pytest.mark.parametrize("url, text, message", [
    ("https://app.example.com/{tenant}/v2", None, "SCIM_PIPELINE_APP_URL is malformed: the only placeholder is"),
    ("https://x.example.com/{organization_id}", None, "SCIM_PIPELINE_APP_TENANTS names no file"),
    ("https://x.example.com/{organization_id}", "org_1: [", "SCIM_PIPELINE_APP_TENANTS .* is malformed: not YAML"),
    ("https://x.example.com/{organization_id}", "- org_1", "expected a mapping of organization ids"),
    ("https://x.example.com/{organization_id}", "org_1:\n  url: ftp://x\n", "org_1: url expected http"),
    ("https://x.example.com/{organization_id}", "org_1:\n  secret: x\n", "org_1: expected a mapping with url"),
    ("https://x.example.com/{organization_id}", "org_1:\n  token: ''\n", "org_1: token expected a non-empty"),
])
def test_bad_scim2_settings_are_one_line_naming_the_setting(home, monkeypatch, tmp_path, url, text, message):
    monkeypatch.setenv("SCIM_PIPELINE_APP_URL", url)
    tenants = tmp_path / "tenants.yaml"
    if text is not None:
        tenants.write_text(text)
    monkeypatch.setenv("SCIM_PIPELINE_APP_TENANTS", str(tenants))
    with pytest.raises(ConfigError, match=message) as info:
        settings().scim2()
    assert "\n" not in str(info.value)


def test_the_postgres_url_is_checked_for_its_shape_and_never_echoed(monkeypatch):
    from scim_pipeline.config import ConfigError, postgres_url
    from scim_pipeline.lib.postgres import redact

    monkeypatch.delenv("SCIM_PIPELINE_POSTGRES_URL", raising=False)
    assert postgres_url() is None  # unset: everything embedded
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", "postgresql://scim:pw@db:5432/scim?sslmode=require")
    assert postgres_url() == "postgresql://scim:pw@db:5432/scim?sslmode=require"
    for bad in ("mysql://scim:s3cret@db/scim", "postgresql://scim:s3cret@db/scim/extra", "db:5432"):
        monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", bad)
        with pytest.raises(ConfigError) as raised:
            postgres_url()
        assert "SCIM_PIPELINE_POSTGRES_URL is malformed" in str(raised.value) and "s3cret" not in str(raised.value)
    assert redact("postgresql://scim:p@ss:w/rd@db:5432/scim") == "postgresql://scim:***@db:5432/scim"
    assert redact("postgresql://scim@db/scim") == "postgresql://scim@db/scim"

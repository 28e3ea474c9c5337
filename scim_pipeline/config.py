"""Settings of one installation, read from the environment.

Every process of an installation shares ``SCIM_PIPELINE_HOME``. Values come from the environment first; where a
variable is unset, the dotenv files that the embedded services write into the home (``emulator.env`` by the Scalekit
emulator, ``app.env`` by the demo application) fill it in, so a pipeline started beside them finds them unaided.
Secrets are held here and never printed: ``Settings.__repr__`` masks them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dotenv import dotenv_values

from scim_pipeline.lib.private_files import write_private

HOME_VAR = "SCIM_PIPELINE_HOME"
DEFAULT_HOME = ".scim_pipeline"
EMULATOR_ENV_FILE = "emulator.env"
APP_ENV_FILE = "app.env"
WAREHOUSE_FILE = "warehouse.duckdb"
INBOX_FILE = "inbox.sqlite"
OUTBOX_INDEX_FILE = "outbox.sqlite"
# One PostgreSQL database for the Dagster instance and the webhook inbox, shared by every host; unset: all embedded.
POSTGRES_URL_VAR = "SCIM_PIPELINE_POSTGRES_URL"
_POSTGRES_URL_RE = re.compile(r"^postgresql://[^\s/]*(/[^\s/?]+)?(\?\S*)?$", re.IGNORECASE)
# Where the SDK's token request (requests) and gRPC channel read the CA roots they trust.
CA_VARS = ("REQUESTS_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # the least the Standard Webhooks protocol recommends for a signing key
_SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9+/=]+$")


class ConfigError(Exception):
    """A missing or malformed setting. Its message is one line that names the variable."""


def home() -> Path:
    """The installation's data folder, created on first use."""
    path = Path(os.environ.get(HOME_VAR) or DEFAULT_HOME).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_dotenv(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a dotenv file (python-dotenv's parser); a missing file is empty."""
    if not path.is_file():
        return {}
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def write_dotenv(path: Path, values: dict[str, str]) -> None:
    """Write dotenv lines atomically, readable by the owner only from the moment the file exists (they hold
    secrets). The lines are ``export KEY='value'``, so that a shell's ``source`` hands them to the programs it
    starts."""
    write_private(path, "".join(f"export {k}='{v}'\n" for k, v in values.items()).encode())


def number_setting(name: str, default: float, expected: str, valid: Callable[[float], bool], parse=float):
    """A numeric variable from the environment, ``default`` when unset; a value that does not parse or is not
    ``valid`` is a ConfigError naming the variable and what was ``expected``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = parse(value)
    except ValueError:
        number = None
    if number is None or not valid(number):
        raise ConfigError(f"{name} is malformed: expected {expected}, got {value!r}")
    return number


def lookup(name: str, home_dir: Path | None = None) -> str | None:
    """A variable from the environment, else from the home's dotenv files written by the embedded services."""
    value = os.environ.get(name)
    if value:
        return value
    home_dir = home_dir or home()
    for filename in (EMULATOR_ENV_FILE, APP_ENV_FILE):
        value = read_dotenv(home_dir / filename).get(name)
        if value:
            return value
    return None


def _secret(name: str, value: str) -> str:
    """``value`` if it is a ``whsec_<base64>`` signing secret whose key is long enough, else ConfigError naming
    ``name`` (never the value)."""
    malformed = ConfigError(f"{name} is malformed: expected a secret of the form whsec_<base64>")
    if not _SECRET_RE.match(value):
        raise malformed
    try:
        # Decoded as the standardwebhooks library decodes it (padding optional), so that this is the key it signs with.
        key = base64.b64decode(value[len(SECRET_PREFIX):] + "==")
    except binascii.Error:
        raise malformed from None
    if len(key) < MIN_SECRET_BYTES:
        # A short key can be found by brute force from one signed request; refused at start-up, not at the first event.
        raise ConfigError(f"{name} is too short: expected at least {MIN_SECRET_BYTES} bytes of key after whsec_ "
                          f"(base64 of {MIN_SECRET_BYTES} to 64 random bytes)")
    return value


@dataclass(frozen=True)
class ScalekitSettings:
    environment_url: str
    client_id: str
    client_secret: str = field(repr=False)


PROTOCOL_VAR = "SCIM_PIPELINE_APP_PROTOCOL"
PROTOCOLS = ("changes", "scim2")
TENANTS_VAR = "SCIM_PIPELINE_APP_TENANTS"
ORG_PLACEHOLDER = "{organization_id}"


@dataclass(frozen=True)
class Scim2Tenant:
    url: str | None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Scim2Settings:
    url: str  # may hold {organization_id}
    token: str | None = field(repr=False)
    tenants: dict[str, Scim2Tenant] = field(default_factory=dict)  # organization id -> its own URL and token


def read_tenants(path: Path) -> dict[str, Scim2Tenant]:
    """The per-organization SCIM URLs and tokens of a YAML file: ``{organization_id: {url: ..., token: ...}}``
    (either key may be left out: the general setting applies). Anything else is a ConfigError naming the setting."""
    import yaml

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{TENANTS_VAR} ({path}) is malformed: {why}")

    if not path.is_file():
        raise ConfigError(f"{TENANTS_VAR} names no file: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise bad(f"not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise bad("expected a mapping of organization ids to {url, token}")
    tenants = {}
    for org, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) - {"url", "token"}:
            raise bad(f"{org}: expected a mapping with url and/or token")
        url, token = entry.get("url"), entry.get("token")
        if url is not None and not (isinstance(url, str) and re.match(r"^https?://[^/\s]+(/\S*)?$", url)):
            raise bad(f"{org}: url expected http(s)://host[:port][/path]")
        if token is not None and not (isinstance(token, str) and token.strip()):
            raise bad(f"{org}: token expected a non-empty string")
        tenants[str(org)] = Scim2Tenant(url.rstrip("/") if url else None, token)
    return tenants


@dataclass(frozen=True)
class Settings:
    home: Path

    def _require(self, name: str) -> str:
        value = lookup(name, self.home)
        if not value:
            raise ConfigError(f"{name} is not set")
        return value

    def scalekit(self) -> ScalekitSettings:
        url = self._require("SCALEKIT_ENVIRONMENT_URL").rstrip("/")
        if not re.match(r"^https://[^/\s]+$", url):
            raise ConfigError(f"SCALEKIT_ENVIRONMENT_URL is malformed: expected https://host[:port], got {url!r}")
        client_id = self._require("SCALEKIT_CLIENT_ID")
        secret = self._require("SCALEKIT_CLIENT_SECRET")
        if not os.environ.get("SCALEKIT_ENVIRONMENT_URL"):
            # The environment came from the emulator's emulator.env: its CA comes with it, over whatever bundle the
            # shell names, since the SDK's token request and gRPC channel read their roots from these variables.
            emulator_env = read_dotenv(self.home / EMULATOR_ENV_FILE)
            for ca_var in CA_VARS:
                if emulator_env.get(ca_var):
                    os.environ[ca_var] = emulator_env[ca_var]
        return ScalekitSettings(url, client_id, secret)

    def webhook_secrets(self) -> list[str]:
        """All accepted webhook signing secrets (several during rotation)."""
        raw = self._require("SCALEKIT_WEBHOOK_SECRET")
        return [_secret("SCALEKIT_WEBHOOK_SECRET", s) for s in raw.split()]

    def app_url(self) -> str:
        url = self._require("SCIM_PIPELINE_APP_URL").rstrip("/")
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            raise ConfigError(f"SCIM_PIPELINE_APP_URL is malformed: expected http(s)://host[:port][/path], got {url!r}")
        return url

    def app_secret(self) -> str:
        return _secret("SCIM_PIPELINE_APP_SECRET", self._require("SCIM_PIPELINE_APP_SECRET"))

    def app_protocol(self) -> str:
        """How change sets reach the application: ``changes`` (this product's endpoint) or ``scim2``."""
        value = (lookup(PROTOCOL_VAR, self.home) or "changes").strip().lower()
        if value not in PROTOCOLS:
            raise ConfigError(f"{PROTOCOL_VAR} is malformed: expected one of {', '.join(PROTOCOLS)}, got {value!r}")
        return value

    def scim2(self) -> "Scim2Settings":
        """The SCIM 2.0 service provider: the base URL (``{organization_id}`` names each organization's tenant),
        the bearer token, and the per-organization URLs and tokens of ``SCIM_PIPELINE_APP_TENANTS``."""
        url = self.app_url()
        if url.replace(ORG_PLACEHOLDER, "").count("{") or url.replace(ORG_PLACEHOLDER, "").count("}"):
            raise ConfigError(f"SCIM_PIPELINE_APP_URL is malformed: the only placeholder is {ORG_PLACEHOLDER}, "
                              f"got {url!r}")
        tenants: dict[str, Scim2Tenant] = {}
        path = os.environ.get(TENANTS_VAR)
        if path:
            tenants = read_tenants(Path(path).expanduser())
        return Scim2Settings(url, lookup("SCIM_PIPELINE_APP_TOKEN", self.home), tenants)

    def role_mappings_path(self) -> Path:
        value = os.environ.get("SCIM_PIPELINE_ROLE_MAPPINGS")
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"SCIM_PIPELINE_ROLE_MAPPINGS names no file: {value}")
            return path
        return default_role_mappings_path()

    @property
    def postgres_url(self) -> str | None:
        """SCIM_PIPELINE_POSTGRES_URL (environment only), or None: Dagster's storage and the inbox stay in the home."""
        return postgres_url()

    @property
    def inbox_location(self) -> str | Path:
        """Where the webhook inbox lives: the PostgreSQL database when one is set, else the SQLite file."""
        return self.postgres_url or self.inbox_path

    @property
    def warehouse_path(self) -> Path:
        return self.home / WAREHOUSE_FILE

    @property
    def inbox_path(self) -> Path:
        return self.home / INBOX_FILE

    @property
    def outbox_index_path(self) -> Path:
        return self.home / OUTBOX_INDEX_FILE


def default_role_mappings_path() -> Path:
    """``role_mappings.yaml`` of the project (the working folder), else the example shipped in the package."""
    local = Path("role_mappings.yaml")
    if local.is_file():
        return local.resolve()
    return Path(__file__).parent / "provisioning" / "role_mappings.yaml"


def postgres_url() -> str | None:
    """``SCIM_PIPELINE_POSTGRES_URL``, checked for its shape (never echoed: it holds a password); None when unset."""
    value = os.environ.get(POSTGRES_URL_VAR, "").strip()
    if not value:
        return None
    if not _POSTGRES_URL_RE.match(value):
        raise ConfigError(f"{POSTGRES_URL_VAR} is malformed: expected postgresql://user:password@host:port/database")
    return value


def check_postgres() -> None:
    """When SCIM_PIPELINE_POSTGRES_URL is set, connect once: a database that is unreachable or refuses the
    credentials is a ConfigError naming the setting, said at start rather than as a traceback in a run."""
    from scim_pipeline.lib.postgres import connect, reason, redact

    url = postgres_url()
    if url is None:
        return
    import psycopg2

    try:
        connect(url).close()
    except psycopg2.Error as exc:
        raise ConfigError(f"{POSTGRES_URL_VAR}: cannot connect to {redact(url)}: "
                          f"{reason(exc, url)}") from None


def settings() -> Settings:
    return Settings(home=home())

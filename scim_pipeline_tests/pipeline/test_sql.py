"""``scim-pipeline sql``: a query past its timeout is interrupted with one line, and a writer waiting for the
warehouse is held up no longer than that."""

import subprocess
import sys
import time

from scim_pipeline.config import settings
from scim_pipeline.warehouse.connection import Warehouse

ENDLESS = "SELECT count(*) FROM range(100000000) a, range(100000000) b"


def _sql(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scim_pipeline.cli", "sql", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_long_query_is_interrupted_and_the_writer_goes_on(home):
    path = settings().warehouse_path
    with Warehouse(path).write():
        pass
    reader = _sql(ENDLESS, "--timeout", "2")
    time.sleep(1.0)  # the reader holds the file
    started = time.monotonic()
    with Warehouse(path, lock_timeout_s=60).write() as con:
        con.execute("INSERT INTO organizations (organization_id, display_name) VALUES ('org_1', 'Acme')")
    waited = time.monotonic() - started
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 1
    assert err.strip().splitlines() == ["scim-pipeline sql: query interrupted after 2s (raise --timeout to allow more)"]
    assert waited < 15, waited  # about the reader's remaining second, plus the lock's retry jitter


def test_a_timeout_must_be_positive(home):
    reader = _sql("SELECT 1", "--timeout", "0")
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 2 and "--timeout" in err


def test_a_quick_query_is_untouched_by_the_timeout(home):
    with Warehouse(settings().warehouse_path).write() as con:
        con.execute("INSERT INTO organizations (organization_id, display_name) VALUES ('org_1', 'Acme')")
    reader = _sql("SELECT organization_id FROM organizations", "--format", "csv", "--timeout", "5")
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.split() == ["organization_id", "org_1"]

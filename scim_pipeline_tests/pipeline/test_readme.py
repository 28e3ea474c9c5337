"""Every README shell block marked `sh safe` runs as written against a synced installation."""

import os
import re
import subprocess
import sys
from pathlib import Path

from scim_pipeline.commands import run_sync

README = Path(__file__).resolve().parents[2] / "README.md"


def safe_blocks() -> list[str]:
    return re.findall(r"^```sh safe\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_safe_blocks_run_as_written(world):
    blocks = safe_blocks()
    assert len(blocks) >= 4
    run_sync(say=lambda _: None)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), block

"""The package's layering rule, checked on the code itself: plain packages import no Dagster, production code never
imports the development stack, the top level keeps the entry points, and no code points outside the repository."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scim_pipeline"
PLAIN = ["lib", "scalekit", "warehouse", "provisioning", "receiver"]


def _modules(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_importing_the_plain_packages_does_not_import_dagster():
    modules = [f"scim_pipeline.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}"
               for pkg in PLAIN for p in _modules(PACKAGE / pkg)]
    code = ("import sys\n" + "".join(f"import {m.removesuffix('.__init__')}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_plain_module_names_dagster_and_no_production_module_names_the_devstack():
    for pkg in PLAIN:
        for path in _modules(PACKAGE / pkg):
            assert not {m for m in _imports(path) if m.split(".")[0] == "dagster"}, path
    production = [p for p in _modules(PACKAGE) if "devstack" not in p.relative_to(PACKAGE).parts]
    for path in production:
        assert not {m for m in _imports(path) if m.startswith("scim_pipeline.devstack")}, path


def test_the_top_level_keeps_the_entry_points_only():
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_no_code_refers_to_a_document_outside_the_repository():
    """Every Markdown file a line names, and every capitalised document a line cites by section (an upper-case
    word followed by a quoted title), is a file of the repository."""
    root = PACKAGE.parent
    documents = {p.name for p in root.glob("*.md")} | {p.name for p in (root / "docs").glob("*.md")}
    stems = {name.removesuffix(".md") for name in documents}
    named = re.compile(r"(?<![\w.])([\w-]+\.md)\b")
    cited = re.compile(r"\b([A-Z]{4,}) \"[A-Z]")
    files = [p for folder in ("scim_pipeline", "scim_pipeline_tests", "bench") for p in (root / folder).rglob("*")
             if p.suffix in (".py", ".c", ".yaml") and "__pycache__" not in p.parts]
    offenders = [f"{p.relative_to(root)}:{n}: {ref}" for p in files
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 for ref in [*named.findall(line), *cited.findall(line)]
                 if ref not in documents and ref not in stems]
    assert offenders == []

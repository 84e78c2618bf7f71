"""The layers point one way (issue 19): adapters never import the services they serve (nor the settings service,
the CLI or the composition root), and the domain imports only itself, the standard library and third-party
packages.

Checked by importing for real in a fresh interpreter with the forbidden packages blocked by a meta-path finder
that raises, so a lazy import inside a function body is caught as soon as the module runs it at import time, and
an import that only appears at call time is caught by the static check of the domain below.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"

_IMPORT_WITH_BLOCKED = textwrap.dedent("""
    import importlib, pkgutil, sys

    BLOCKED = tuple(sys.argv[1].split(","))
    PACKAGE = sys.argv[2]

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"layer violation: {name} imported while importing {PACKAGE} modules")
            return None

    sys.meta_path.insert(0, Blocker())
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE] + [f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in names:
        importlib.import_module(name)
    print("\\n".join(names))
""")


def _import_all(package: str, blocked: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _IMPORT_WITH_BLOCKED, ",".join(blocked), package], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def _modules(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.glob("*.py"))


def test_every_adapter_imports_without_services_settings_cli_or_the_composition_root() -> None:
    imported = _import_all("core.adapters", ["core.services", "core.settings", "core.cli", "core.bootstrap"])
    expected = {f"core.adapters.{p.stem}" for p in _modules(CORE / "adapters") if p.stem != "__init__"}
    assert expected <= set(imported)


def test_the_blocker_really_blocks() -> None:
    """The check above can fail: importing the services with the services blocked is refused."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_WITH_BLOCKED, "core.services", "core.services"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "layer violation: core.services" in done.stderr


def test_every_domain_module_imports_with_the_rest_of_the_product_blocked() -> None:
    blocked = [f"core.{m.name}" for m in pkgutil.iter_modules([str(CORE)]) if m.name != "domain"]
    blocked += ["functions", "emulators", "local", "function_app"]
    imported = _import_all("core.domain", blocked)
    assert {f"core.domain.{p.stem}" for p in _modules(CORE / "domain") if p.stem != "__init__"} <= set(imported)


def _imported_names(path: Path, package: str) -> list[tuple[int, str]]:
    """Every imported module name with its line, relative imports resolved against ``package``."""
    parent = package.rsplit(".", 1)[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else parent
                out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                out.append((node.lineno, node.module or ""))
    return out


@pytest.mark.parametrize("path", _modules(CORE / "domain"), ids=lambda p: p.name)
def test_domain_imports_only_itself_stdlib_and_third_party(path: Path) -> None:
    """Static: also catches imports inside functions (which the import tests above never run)."""
    ours = ("core", "functions", "emulators", "local", "function_app", "tests", "bench")
    bad = [f"{path.name}:{line}: {name}" for line, name in _imported_names(path, "core.domain")
           if name.split(".")[0] in ours and not (name == "core.domain" or name.startswith("core.domain."))]
    assert not bad, bad


@pytest.mark.parametrize("path", _modules(CORE / "adapters"), ids=lambda p: p.name)
def test_adapters_never_import_services_settings_cli_or_the_composition_root(path: Path) -> None:
    forbidden = ("core.services", "core.settings", "core.cli", "core.bootstrap")
    bad = [f"{path.name}:{line}: {name}" for line, name in _imported_names(path, "core.adapters")
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, bad

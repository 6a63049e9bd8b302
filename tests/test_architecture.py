"""The house rule that keeps the core testable: ``policy/`` and ``codec/`` are
pure. Importing them must load no Twisted, no network and no asyncio."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import postfix_mtasts.codec
import postfix_mtasts.policy

FORBIDDEN = ("twisted", "treq", "dns", "asyncio", "socket", "ssl", "OpenSSL", "sqlite3", "redis", "psycopg")


def _modules(package: object) -> list[str]:
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [info.name for info in pkgutil.iter_modules(path, prefix)]


def test_pure_packages_import_nothing_impure() -> None:
    modules = _modules(postfix_mtasts.policy) + _modules(postfix_mtasts.codec)
    assert "postfix_mtasts.policy.policyfile" in modules and "postfix_mtasts.codec.socketmap" in modules
    program = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"pure modules pulled in: {result.stdout.strip()}"

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


def test_only_the_redis_and_postgresql_stores_need_an_asyncio_loop() -> None:
    """The daemon runs on the epoll reactor unless the cache backend is one of
    cli.ASYNCIO_BACKENDS; no other module may rely on a running asyncio loop."""
    from postfix_mtasts import cli

    assert cli.ASYNCIO_BACKENDS == {"redis", "postgresql"}
    package_dir = postfix_mtasts.codec.__path__[0].rsplit("/", 1)[0]
    users = []
    for info in pkgutil.walk_packages([package_dir], "postfix_mtasts."):
        path = info.module_finder.path + "/" + info.name.rsplit(".", 1)[-1]  # type: ignore[union-attr]
        source_path = path + ("/__init__.py" if info.ispkg else ".py")
        with open(source_path, encoding="utf-8") as f:
            text = f.read()
        if "import asyncio" in text or "asyncio_bridge" in text or "asyncioreactor" in text:
            users.append(info.name)
    assert sorted(users) == [
        "postfix_mtasts.asyncio_bridge",
        "postfix_mtasts.cache.postgresql",
        "postfix_mtasts.cache.redis",
        "postfix_mtasts.cli",
    ]


def test_the_reactor_is_epoll_by_default_and_asyncio_when_asked() -> None:
    program = (
        "import sys\n"
        "from postfix_mtasts import cli\n"
        "reactor = cli._install_reactor(sys.argv[1] == 'asyncio')\n"
        "print(type(reactor).__name__)\n"
    )
    names = [
        subprocess.run([sys.executable, "-c", program, wanted], capture_output=True, text=True,
                       check=True).stdout.strip()
        for wanted in ("default", "asyncio")
    ]
    assert names == ["EPollReactor", "AsyncioSelectorReactor"]


def test_the_report_figures_pages_and_alert_decisions_are_pure() -> None:
    """What the daemon's report watch computes and renders is plain Python: no reactor, no I/O.
    (The ``tlsrpt`` package reads mail, and the standard ``email`` package imports ``socket``.)"""
    modules = [f"postfix_mtasts.tlsrpt.{name}" for name in ("series", "dashboard", "alerts")]
    forbidden = tuple(name for name in FORBIDDEN if name != "socket")
    program = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"pure modules pulled in: {result.stdout.strip()}"

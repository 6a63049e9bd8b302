"""The house rule that keeps the core testable: ``policy/``, ``codec/`` and
doctor's decisions are pure. Importing them must load no Twisted, no network
and no asyncio (and, for doctor, no subprocess)."""

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


def _sources() -> dict[str, str]:
    """Every module of the package: dotted name → source text."""
    import pathlib

    root = pathlib.Path(postfix_mtasts.codec.__path__[0]).parent
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def test_only_the_command_line_touches_the_global_reactor() -> None:
    """Every other module takes the reactor (or a clock) it is given, so tests
    can pass a Clock or a fake; only cli.py picks and installs the real one."""
    import ast

    users = []
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet" and any(
                alias.name == "reactor" for alias in node.names
            ):
                users.append(name)
            elif isinstance(node, ast.Import) and any(
                alias.name == "twisted.internet.reactor" for alias in node.names
            ):
                users.append(name)
    assert sorted(set(users)) == ["postfix_mtasts.cli"]


def _imports(name: str, text: str, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, at any depth in the file."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(text)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules and target != name:
                found.add(target)
    return found


def test_the_package_has_no_import_cycles() -> None:
    """Data flows one way (DESIGN.md): control and metrics read the service
    through small interfaces, so nothing below the service imports it back."""
    sources = _sources()
    modules = set(sources)
    graph = {name: _imports(name, text, modules) for name, text in sources.items()}
    # A package's __init__ importing its own submodule, and the submodule
    # importing the package for a re-export, is not a cycle of design.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not (t.startswith(name + ".") or name.startswith(t + "."))}

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_doctor_decisions_are_pure() -> None:
    """doctor's decisions run no program and open no socket: only doctor.run does."""
    modules = [f"postfix_mtasts.doctor.{name}" for name in ("postfix", "maps", "settings")]
    program = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {(*FORBIDDEN, 'subprocess')!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"doctor's pure modules pulled in: {result.stdout.strip()}"


#: The most lines a module of the package may have: past it, a module does
#: more than one job and becomes a package (DESIGN.md, "Small rooms").
MODULE_LINES_MAX = 600


def test_every_module_stays_a_small_room() -> None:
    lines = {name: text.count("\n") for name, text in _sources().items()}
    assert {name: count for name, count in lines.items() if count > MODULE_LINES_MAX} == {}


def test_the_lookup_does_only_io_in_at_most_500_lines() -> None:
    """The RFC 8461 decisions live in policy.freshness; lookup.py keeps the waiting."""
    assert _sources()["postfix_mtasts.lookup"].count("\n") <= 500

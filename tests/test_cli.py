"""The ``postfix-mtasts`` command as an administrator runs it: ``query``,
``serve`` start-up errors and ``--version``, each in a real child process."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts import __version__
from tests.support.daemon import LOOPBACK, ensure_deferred, free_port, run_cli

pytestmark = pytest.mark.integration


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# --- --version and configuration errors -----------------------------------


@ensure_deferred
async def test_version_prints_the_package_version() -> None:
    result = await run_cli(reactor(), "--version")

    assert result.code == 0, result
    assert result.stdout.strip() == f"postfix-mtasts {__version__}"


BAD_CONFIGS = [
    pytest.param('[policy]\nrecheck_interval = "soon"\n', "policy.recheck_interval", id="wrong-type"),
    pytest.param('[listen]\nsocketmapp = ["inet:127.0.0.1:8461"]\n', "listen.socketmapp", id="unknown-key"),
    pytest.param('[cache]\nbackend = "sqlight"\n', "cache.backend", id="bad-choice"),
    pytest.param('[listen]\nsocketmap = ["inet:127.0.0.1:99999"]\n', "listen.socketmap[0]", id="bad-port"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
@ensure_deferred
async def test_serve_with_a_bad_config_says_one_line_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)

    result = await run_cli(reactor(), "serve", "--config", str(config))

    assert result.code == 2, result
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert key in line
    assert str(config) in line
    assert result.stdout == ""


@ensure_deferred
async def test_serve_with_a_missing_config_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    result = await run_cli(reactor(), "serve", "--config", str(missing))

    assert result.code == 2, result
    assert result.stderr_lines == [
        f"postfix-mtasts: {missing}: cannot read configuration: No such file or directory"
    ]


@ensure_deferred
async def test_serve_on_an_address_in_use_fails_with_one_error_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind((LOOPBACK, 0))
        occupant.listen()
        taken = occupant.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(
            f'[listen]\nsocketmap = ["inet:{LOOPBACK}:{free_port()}"]\n'
            f'tcp_table = ["inet:{LOOPBACK}:{taken}"]\n'
            f'[cache]\nbackend = "sqlite"\npath = "{tmp_path}/cache.db"\n'
        )

        result = await run_cli(reactor(), "serve", "--config", str(config))

    assert result.code == 1, result
    assert_no_traceback(result.stderr)
    errors = [line for line in result.stderr_lines if " ERROR " in f" {line} "]
    assert len(errors) == 1, result.stderr
    assert f"inet:{LOOPBACK}:{taken}" in errors[0]
    assert "tcp_table" in errors[0]
    # It never claimed to be ready, and closed what it had opened.
    assert not any(line.endswith(" ready") for line in result.stderr_lines), result.stderr
    assert any(line.endswith(" stopped") for line in result.stderr_lines), result.stderr

"""The test plumbing itself: the real redis-server fixtures, free ports, and the ``foveate`` entry point."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from foveate import __version__
from foveate.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_redis_server_set_get_round_trip(redis_server: str) -> None:
    assert redis_server.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(redis_server)
    try:
        assert client.dbsize() == 0  # a fresh server, not someone else's
        assert client.set("foveate:test", b"\x00patch\xff")
        assert client.get("foveate:test") == b"\x00patch\xff"
    finally:
        client.close()


def test_redis_server_restarts_empty_on_same_port(redis_server_factory: Callable[[], Any]) -> None:
    server = redis_server_factory()
    url = server.url
    client = redis.Redis.from_url(url)
    try:
        client.set("k", "v")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert server.url == url
        assert client.ping()
        assert client.get("k") is None  # no persistence: a restart loses everything
    finally:
        client.close()


def test_two_redis_servers_are_isolated(redis_server_factory: Callable[[], Any]) -> None:
    a, b = redis_server_factory(), redis_server_factory()
    assert a.port != b.port
    ca, cb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    try:
        ca.set("only-in-a", 1)
        assert cb.get("only-in-a") is None
    finally:
        ca.close()
        cb.close()


def test_free_port_is_bindable_on_loopback(free_port: Callable[[], int]) -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_cli_version_via_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "foveate", "--version"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"foveate {__version__}"


def test_cli_without_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: foveate" in capsys.readouterr().err


def _write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_cli_dispatches_to_registered_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "fake_foveate_cmds",
        """
        def _echo(args):
            return 7 if args.loud else None

        def register(subparsers):
            parser = subparsers.add_parser("echo")
            parser.add_argument("--loud", action="store_true")
            parser.set_defaults(func=_echo)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("foveate.cli.COMMAND_MODULES", ("fake_foveate_cmds", "no_such_foveate_module.cli"))
    assert main(["echo", "--loud"]) == 7
    assert main(["echo"]) == 0


def test_cli_surfaces_a_broken_command_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A command module that exists but cannot import a dependency is a broken install, not "no commands".
    _write_module(tmp_path, "broken_foveate_cmds", "import no_such_dependency_for_foveate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_for_foveate"):
        build_parser(["broken_foveate_cmds"])


def test_cli_reports_foveate_errors_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_module(
        tmp_path,
        "failing_foveate_cmds",
        """
        from learner.errors import ConfigError

        def _fail(args):
            raise ConfigError("hidden_size must be positive; got -1")

        def register(subparsers):
            subparsers.add_parser("fail").set_defaults(func=_fail)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("foveate.cli.COMMAND_MODULES", ("failing_foveate_cmds",))
    assert main(["fail"]) == 1
    assert "foveate fail: error: hidden_size must be positive; got -1" in capsys.readouterr().err


def test_cli_lets_other_exceptions_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only deliberate FoveateErrors become a one-line message; a bug keeps its traceback.
    _write_module(
        tmp_path,
        "buggy_foveate_cmds",
        """
        def _bug(args):
            raise ZeroDivisionError("a real bug")

        def register(subparsers):
            subparsers.add_parser("bug").set_defaults(func=_bug)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("foveate.cli.COMMAND_MODULES", ("buggy_foveate_cmds",))
    with pytest.raises(ZeroDivisionError, match="a real bug"):
        main(["bug"])

"""bench/coordination.py's quick mode runs and its exactly-once checks hold (not a performance test)."""

import pytest

from bench.coordination import main


def _check(results: list, modes: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert [result.mode for result in results] == modes
    for result in results:
        assert result.checks["exactly_once"], (result.mode, result.checks)
        assert result.checks["rows"] == result.checks["completed_200"] == 40  # --quick: 8 workers x 5 jobs
        assert sum(result.recorded["per_worker"].values()) == 40
        assert 0 < result.wall < 30
    printed = capsys.readouterr().out
    for mode in modes:
        assert f"| {mode} |" in printed


def test_quick_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    _check(main(["--quick", "--modes", "sqlite"]), ["sqlite"], capsys)


def test_quick_postgres(pg_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Both PostgreSQL modes, each in a schema of its own in the session's database."""
    modes = ["pg-threads", "pg-processes"]
    _check(main(["--quick", "--store", pg_server, "--modes", ",".join(modes)]), modes, capsys)

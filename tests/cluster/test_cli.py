"""`kvbound serve --ray`: its flags are checked before Ray starts or a model loads (one error line, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.conftest import NEEDS_SERVE

pytest.importorskip("fastapi", reason=NEEDS_SERVE)

from kvbound.cli.app import main  # noqa: E402


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "2"], "--replicas and --address take effect with --ray"),
    (["--address", "auto"], "--replicas and --address take effect with --ray"),
    (["--ray"], "a cluster needs --data-dir"),
    (["--ray", "--data-dir", "{tmp}", "--port", "0"], "needs a fixed --port"),
    (["--ray", "--data-dir", "{tmp}", "--replicas", "0"], "--replicas"),
])
def test_bad_cluster_flags_fail_before_anything_starts(argv: list[str], message: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code = main(["serve", *(a.replace("{tmp}", str(tmp_path)) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in " ".join(err.split()), err

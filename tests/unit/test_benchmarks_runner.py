"""`python -m benchmarks`: every suite it runs has a report section, unknown suites are refused, and setup installs
only what the chosen suites lack."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import benchmarks.__main__ as runner
from benchmarks import common, report


def test_every_suite_has_a_module_and_a_report_section():
    assert set(runner.SUITES) == {name for name, _, _ in report.SECTIONS}
    for command in runner.SUITES.values():
        assert callable(importlib.import_module(command.split()[0]).main)
    assert set(runner.PEERS) <= set(runner.SUITES)


def test_unknown_suite_is_refused():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--no-setup", "decod"], capture_output=True, text=True,
                          cwd=common.ROOT)
    assert done.returncode == 2
    assert "unknown suite(s) decod" in done.stderr and "choose from decode" in done.stderr


def test_setup_installs_only_missing_peers(monkeypatch, tmp_path):
    (tmp_path / "kvpress" / "bin").mkdir(parents=True)
    (tmp_path / "kvpress" / "bin" / "python").touch()  # kvpress is there, llamacpp is not
    monkeypatch.setattr(common, "venv_python", lambda name: tmp_path / name / "bin" / "python")
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: object())  # the bench extra is installed
    calls = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    runner.setup(["kvpress", "estimate_accuracy"])
    assert calls == []
    runner.setup(["decode", "weights", "kvpress"])
    assert len(calls) == 1 and calls[0][-2:] == [str(common.ROOT / "benchmarks" / "peers" / "setup.sh"), "llamacpp"]


@pytest.mark.parametrize("missing", [["matplotlib"], []])
def test_setup_installs_the_bench_extra_when_missing(monkeypatch, missing):
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None if name in missing else object())
    calls = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    runner.setup(["estimate_accuracy"])
    assert bool(calls) == bool(missing)
    if missing:
        assert calls[0][:4] == [sys.executable, "-m", "pip", "install"] and calls[0][-1].endswith("[bench]")

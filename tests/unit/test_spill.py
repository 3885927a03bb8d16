"""The server's spill directory: one per server process, removed at close; a killed server's directory is removed
by the next server on the host, a live one's never (Ray replicas share one --data-dir)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from kvbound.server.spill import SPILL_PREFIX, Spill


def test_each_spill_has_its_own_directory_and_removes_it(tmp_path) -> None:
    a, b = Spill(1 << 20, tmp_path), Spill(1 << 20, tmp_path)
    assert a.directory != b.directory and a.directory.parent == b.directory.parent == tmp_path
    assert a.put("s1", {"messages": [], "kv": torch.ones(8)}) and b.put("s1", {"messages": [], "kv": torch.zeros(8)})
    assert a.take("s1", [])["kv"].sum() == 8 and b.take("s1", [])["kv"].sum() == 0  # neither sees the other's
    a.close()
    assert not a.directory.exists() and b.directory.exists()


def test_a_killed_servers_directory_goes_and_a_live_ones_stays(tmp_path) -> None:
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{SPILL_PREFIX}{host}-{dead.stdout.strip()}-x1"
    live = tmp_path / f"{SPILL_PREFIX}{host}-{os.getpid()}-x2"
    other_host = tmp_path / f"{SPILL_PREFIX}elsewhere-{dead.stdout.strip()}-x3"
    for d in (gone, live, other_host):
        d.mkdir()
        (d / "s.kvs").write_bytes(b"state")
    spill = Spill(1 << 20, tmp_path)
    assert not gone.exists() and live.exists() and other_host.exists()
    spill.close()


def test_a_state_over_the_budget_is_not_kept(tmp_path) -> None:
    spill = Spill(100, tmp_path)
    assert not spill.put("big", {"messages": [], "kv": torch.ones(64)})  # 256 bytes of tensor
    assert "big" not in spill and spill.bytes == 0


def test_without_a_data_dir_the_system_temporary_directory_is_cleaned_too(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{SPILL_PREFIX}{socket.gethostname()}-{dead.stdout.strip()}-x1"
    gone.mkdir()
    spill = Spill(1 << 20)
    assert spill.directory.parent == tmp_path and not gone.exists()
    spill.close()
    assert not spill.directory.exists()

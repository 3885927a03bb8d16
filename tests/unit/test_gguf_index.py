"""The lean GGUF reader against the gguf package's reader: the same metadata values, the same tensors and bytes;
clear errors on damaged files; and the two RSS properties it exists for (metadata cost, released pages)."""

from __future__ import annotations

import gc

import gguf
import numpy as np
import pytest
import torch

from kvbound.errors import ModelFormatError
from kvbound.kvcache.pool import lazy_zeros
from kvbound.loading import open_checkpoint
from kvbound.loading.gguf_index import GGUFFormatError, GGUFIndex
from tests.helpers_gguf import write_gguf


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _same_as_gguf_reader(path) -> None:
    ours, theirs = GGUFIndex(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert ours.fields[key] == pytest.approx(value), key
        else:
            assert ours.fields[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.n_bytes, a.data_offset) == (b.tensor_type, int(b.n_bytes), int(b.data_offset)), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_tiny_written_file_reads_like_the_gguf_package(tmp_path):
    _same_as_gguf_reader(write_gguf(tmp_path / "tiny.gguf", layers=2))


def test_default_model_reads_like_the_gguf_package(smollm2_gguf):
    _same_as_gguf_reader(smollm2_gguf)


def test_metadata_of_the_default_model_costs_far_less_than_the_gguf_package(smollm2_gguf):
    """gguf.GGUFReader holds ~157 MB for the default GGUF's vocabulary and merges; ours a few MB."""
    gc.collect()
    before = _rss_bytes()
    index = GGUFIndex(smollm2_gguf)
    assert len(index.fields["tokenizer.ggml.tokens"]) == 49152
    assert _rss_bytes() - before < 40 << 20


def test_release_drops_a_tensors_pages(smollm2_gguf):
    index = GGUFIndex(smollm2_gguf)
    t = max(index.tensors, key=lambda t: t.n_bytes)  # the Q8_0 embedding, ~31 MB
    before = _rss_bytes()
    checksum = int(t.data.sum(dtype=np.int64))  # touches every page
    assert _rss_bytes() - before > t.n_bytes // 2
    index.release(t)
    assert _rss_bytes() - before < t.n_bytes // 4
    assert int(t.data.sum(dtype=np.int64)) == checksum  # re-read from the file: same bytes


@pytest.mark.parametrize("cut", [3, 20, 200, -10])
def test_truncated_files_are_clear_errors(tmp_path, cut):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:cut])  # the first bytes, or all but the last 10
    with pytest.raises(GGUFFormatError):
        GGUFIndex(bad)
    if bad.stat().st_size >= 32:
        with pytest.raises(ModelFormatError, match="not a readable GGUF|truncated"):
            open_checkpoint(bad)


def test_wrong_version_says_so(tmp_path):
    data = bytearray(write_gguf(tmp_path / "good.gguf").read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="version 7"):
        GGUFIndex(tmp_path / "v7.gguf")


def test_lazy_zeros_are_zero_and_cost_rss_only_when_written():
    gc.collect()
    before = _rss_bytes()
    t = lazy_zeros(64, 1024, 1024, dtype=torch.bfloat16, device="cpu")  # 128 MiB
    assert _rss_bytes() - before < 16 << 20
    t[0].fill_(1.0)  # 2 MiB written
    assert _rss_bytes() - before < 24 << 20
    assert float(t[1:4].abs().sum()) == 0.0 and float(t[0].sum()) == 1024 * 1024
    small = lazy_zeros(3, 4, dtype=torch.float32, device="cpu")
    assert small.shape == (3, 4) and not small.any()

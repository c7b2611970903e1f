"""Extraction while the download runs (agents/preparer/stream.py): a small download is
extracted after it ends, without a thread; a large one by a thread reading behind it,
whose work a download starting again voids. Real archives and the real extraction; the
fetch is scripted (agents/system/fetch.py has tests of its own against real servers)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
from preparer_support import tree_tarball

from agents.preparer import stream
from agents.system.archive import Extracted, Limits, extract

LIMITS = Limits(max_bytes=10 << 20, max_files=1000)


def artifact(tmp_path: Path, files: dict[str, bytes]) -> bytes:
    path = tmp_path / "artifact.tar.gz"
    tree_tarball(path, files)
    return path.read_bytes()


def writing(data: bytes, piece: int = 4096, first: bytes = b"") -> Callable[[BinaryIO], int]:
    """A fetch that writes ``first`` (then starts again from byte 0, as after a server
    that cannot resume), then ``data`` in pieces of ``piece`` bytes."""

    def fetch(sink: BinaryIO) -> int:
        if first:
            sink.write(first)
            sink.seek(0)
            sink.truncate()
        for at in range(0, len(data), piece):
            sink.write(data[at : at + piece])
        return len(data)

    return fetch


def extracting(into: Path) -> Callable[[BinaryIO | Path], Extracted]:
    into.mkdir()
    return lambda source: extract(source, into, LIMITS)


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads the stream starts."""
    started: list[str] = []
    real = stream.threading.Thread

    def recording(*args: object, **kwargs: object) -> threading.Thread:
        started.append(str(kwargs.get("name")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stream.threading, "Thread", recording)
    return started


def test_a_small_download_is_extracted_after_it_ends_without_a_thread(
    tmp_path: Path, threads: list[str]
) -> None:
    data = artifact(tmp_path, {"bin/run": b"#!/bin/sh\n"})
    fetched, extracted = stream.fetch_extracting(
        tmp_path / "download", writing(data), extracting(tmp_path / "dest")
    )
    assert fetched == len(data) and isinstance(extracted, Extracted)
    assert (tmp_path / "dest" / "bin" / "run").read_bytes() == b"#!/bin/sh\n"
    assert (tmp_path / "download").read_bytes() == data
    assert threads == []


def test_a_large_download_is_extracted_behind_it_by_a_thread(
    tmp_path: Path, threads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "INLINE_BYTES", 8192)
    files = {f"f{n}": os.urandom(4096) for n in range(8)}
    data = artifact(tmp_path, files)
    _, extracted = stream.fetch_extracting(
        tmp_path / "download", writing(data, piece=1024), extracting(tmp_path / "dest")
    )
    assert isinstance(extracted, Extracted) and threads == ["extract"]
    for name, content in files.items():
        assert (tmp_path / "dest" / name).read_bytes() == content


def test_a_download_started_again_before_the_thread_is_extracted_whole(
    tmp_path: Path, threads: list[str]
) -> None:
    data = artifact(tmp_path, {"VERSION": b"2\n"})
    _, extracted = stream.fetch_extracting(
        tmp_path / "download",
        writing(data, first=b"the first attempt's bytes"),
        extracting(tmp_path / "dest"),
    )
    assert isinstance(extracted, Extracted) and threads == []
    assert (tmp_path / "dest" / "VERSION").read_bytes() == b"2\n"


def test_a_download_started_again_voids_what_the_thread_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "INLINE_BYTES", 8192)
    data = artifact(tmp_path, {f"f{n}": os.urandom(4096) for n in range(8)})
    _, extracted = stream.fetch_extracting(
        tmp_path / "download",
        writing(data, piece=1024, first=data[:10000]),
        extracting(tmp_path / "dest"),
    )
    assert isinstance(extracted, stream.Restarted)
    assert (tmp_path / "download").read_bytes() == data  # the caller extracts it again


def test_a_failed_fetch_raises_once_the_extraction_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "INLINE_BYTES", 8192)
    data = artifact(tmp_path, {f"f{n}": os.urandom(4096) for n in range(8)})
    extractions: list[object] = []

    def cut_off(sink: BinaryIO) -> int:
        sink.write(data[:20000])
        raise OSError("connection reset")

    def extract_noting(source: BinaryIO | Path) -> Extracted:
        try:
            return extract(source, tmp_path / "dest", LIMITS)
        finally:
            extractions.append("ended")

    (tmp_path / "dest").mkdir()
    with pytest.raises(OSError, match="connection reset"):
        stream.fetch_extracting(tmp_path / "download", cut_off, extract_noting)
    assert extractions == ["ended"]

    small = artifact(tmp_path, {"a": b"a"})

    def cut_off_small(sink: BinaryIO) -> int:
        sink.write(small)
        raise OSError("reset")

    with pytest.raises(OSError, match="reset"):  # a small one is not extracted at all
        stream.fetch_extracting(tmp_path / "download2", cut_off_small, extract_noting)
    assert extractions == ["ended"]

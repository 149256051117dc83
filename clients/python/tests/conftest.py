"""Fixtures: a real ``comfyrelay dev`` (the built binary, free ports, a temporary data directory), test
images, and a TCP proxy whose connections a test can cut."""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import subprocess
import threading
import zlib
from typing import Dict, Iterator, List, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def binary() -> str:
    path = os.environ.get("COMFYRELAY_BIN") or str(REPO / "target" / "debug" / "comfyrelay")
    if not os.path.exists(path):
        pytest.fail(f"no comfyrelay binary at {path}: build it (cargo build) or set COMFYRELAY_BIN")
    return path


class Dev:
    """``comfyrelay dev`` in ``directory``; ``target`` is its gRPC ``host:port``."""

    def __init__(self, directory: pathlib.Path, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "COMFYRELAY_GRPC__LISTEN": "127.0.0.1:0",
            "COMFYRELAY_LOG__FILTER": "warn",
            **(env or {}),
        }
        self.directory = directory
        self.process = subprocess.Popen(
            [binary(), "dev", "--comfy-port", "0", *args],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: List[str] = []
        found = threading.Event()
        self.target = ""

        def drain() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("comfyrelay dev: gRPC on "):
                    self.target = line.split("http://", 1)[1].strip()
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(90) or not self.target:
            self.stop()
            pytest.fail("comfyrelay dev did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """One dev server for the session; nodes take 300 ms with 4 progress steps, so streams last."""
    server = Dev(tmp_path_factory.mktemp("dev"), "--node-delay", "300ms", "--progress-steps", "4")
    yield server
    server.stop()


_salt = iter(range(1, 1_000_000))


def png(width: int = 16, height: int = 12) -> bytes:
    """An 8-bit RGB PNG with a gradient; each call's bytes differ (so ComfyUI's cache never skips nodes)."""
    salt = next(_salt)
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, salt % 256))
        for y in range(height)
    )
    return _encode_png(width, height, rows)


def noise_png(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG of random pixels: about 3 bytes a pixel, however it is inverted."""
    rows = b"".join(b"\x00" + os.urandom(width * 3) for _ in range(height))
    return _encode_png(width, height, rows)


def _encode_png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


class Proxy:
    """Forwards 127.0.0.1:port to ``upstream``; ``cut()`` drops the open connections (new ones work).
    With ``cut_first_after``, the first connection is also cut once it has carried that many bytes from
    the server."""

    def __init__(self, upstream: str, cut_first_after: Optional[int] = None) -> None:
        self.cut_first_after = cut_first_after
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: List[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.accepted += 1
                self.open += [client, server]
                limit = self.cut_first_after if self.accepted == 1 else None
            for a, b, most in ((client, server, None), (server, client, limit)):
                threading.Thread(target=self._pump, args=(a, b, most), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: Optional[int]) -> None:
        left = limit
        try:
            while left is None or left > 0:
                data = source.recv(65536 if left is None else min(65536, left))
                if not data:
                    break
                sink.sendall(data)
                if left is not None:
                    left -= len(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            sockets, self.open = self.open, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(dev: Dev) -> Iterator[Proxy]:
    p = Proxy(dev.target)
    yield p
    p.close()

"""``api_key=`` against a server that requires keys: a key made by ``comfyrelay keys create`` is sent as
``authorization: Bearer <key>``; without it every call is refused."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest

from comfyrelay import Client, RpcError
from conftest import Dev, binary, png


def test_a_created_key_is_sent_with_api_key_and_calls_without_it_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYRELAY_API_KEY", raising=False)
    server = Dev(tmp_path, env={"COMFYRELAY_AUTH__MODE": "keys"})
    try:
        created = subprocess.run(
            [binary(), "keys", "create", "--tenant", "python", "--role", "submitter"],
            cwd=tmp_path,
            env={"PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("cr_")

        with Client(server.target) as anonymous:
            with pytest.raises(RpcError) as refused:
                anonymous.workflows()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.reason == "API_KEY_MISSING"
        assert key not in str(refused.value)

        with Client(server.target, api_key=key) as client:
            assert any(w.name == "invert" for w in client.workflows())
            job = client.submit("invert", png())
            assert client.get(job.id).id == job.id
        assert not any(key in line for line in server.lines), "the key reached the server's output"
    finally:
        server.stop()

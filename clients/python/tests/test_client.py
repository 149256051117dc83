"""The wrapper against a real ``comfyrelay dev``: submit, stream across a forced disconnect, run, errors
decoded from ``google.rpc`` details, and a submit retried until a server comes up."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from comfyrelay import Client, JobFailed, RpcError
from comfyrelay.v1 import comfyrelay_pb2 as pb
from comfyrelay.v1 import comfyrelay_pb2_grpc as rpc
from conftest import Dev, Proxy, noise_png, png, png_size


def test_submit_returns_the_queued_job_and_stream_follows_it_to_the_end(dev):
    with Client(dev.target) as client:
        job = client.submit("scale-blur", png(), params={"width": 8, "height": 6, "sigma": 0.5, "crop": "center"})
        assert job.state == pb.JOB_STATE_QUEUED
        assert job.inputs["width"] == "8"
        events = list(client.stream(job.id))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].WhichOneof("kind") == "succeeded"
    assert any(e.WhichOneof("kind") == "progress" for e in events)


def test_stream_resumes_after_a_forced_disconnect_without_duplicate_or_gap(dev, proxy):
    with Client(dev.target) as direct, Client(proxy.target) as client:
        job = direct.submit("invert", png())
        seen, cut = [], False
        for event in client.stream(job.id):
            seen.append(event)
            if not cut and event.WhichOneof("kind") == "progress":
                proxy.cut()
                cut = True
        assert client.reconnects >= 1, "the cut must force a resume"
        assert proxy.accepted >= 2
        assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
        assert seen[-1].WhichOneof("kind") == "succeeded"
        replay = list(direct.stream(job.id))
        assert [(e.sequence, e.WhichOneof("kind")) for e in seen] == [(e.sequence, e.WhichOneof("kind")) for e in replay]


def test_run_waits_and_returns_the_outputs(dev, tmp_path):
    image = png(10, 7)
    with Client(dev.target) as client:
        outputs = client.run("invert", image, out_dir=tmp_path)
    assert len(outputs) == 1
    out = outputs[0]
    assert (out.width, out.height) == (10, 7) == png_size(out.data)
    assert hashlib.sha256(out.data).hexdigest() == out.sha256
    assert out.path is not None and out.path.read_bytes() == out.data


def test_a_bad_request_is_decoded(dev):
    with Client(dev.target) as client:
        with pytest.raises(RpcError) as caught:
            client.submit("scale-blur", png(), params={"blur_radius": 99, "sigma": 100.0})
    e = caught.value
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in e.field_violations]
    assert fields == ["parameters[blur_radius]", "parameters[sigma]"], fields
    assert "out of range" in e.field_violations[0].description
    assert (e.reason, e.domain) == ("INVALID_ARGUMENT", "comfyrelay.dev")
    assert "field `parameters[blur_radius]`" in str(e)


def test_a_failed_job_raises_job_failed_with_the_reason(dev):
    with Client(dev.target) as client:
        with pytest.raises(JobFailed) as caught:
            client.run("scale-blur", png(), params={"width": 5000, "height": 5000})
    assert (caught.value.state, caught.value.reason) == ("failed", "EXECUTION")
    assert caught.value.node_errors[0].class_type == "ImageScale"


def test_not_found_is_not_retried(dev):
    with Client(dev.target) as client:
        with pytest.raises(RpcError) as caught:
            list(client.stream("01234567-89ab-7def-8123-456789abcdef"))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert client.reconnects == 0


def test_submit_waits_for_a_server_that_is_not_up_yet_and_makes_one_job(tmp_path):
    # A port nobody listens on yet: the submit is UNAVAILABLE until a server starts there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(f"127.0.0.1:{port}", reconnect_for=60)
    outcome = {}

    def submit() -> None:
        try:
            outcome["job"] = client.submit("invert", png(8, 8))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=submit)
    thread.start()
    deadline = time.monotonic() + 30
    while client.call_retries == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # a probe of the client's own counter
    assert client.call_retries > 0, "the submit must be retried while no server answers"
    server = Dev(tmp_path, env={"COMFYRELAY_GRPC__LISTEN": f"127.0.0.1:{port}"})
    try:
        thread.join(90)
        assert "job" in outcome, outcome
        job = outcome["job"]
        assert job.request_id.startswith("py-"), job
        listed = client.jobs.ListJobs(pb.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [job.id], "one job for the retried submit"
        assert client.wait(job.id), "it runs to its outputs"
    finally:
        client.close()
        server.stop()


def test_a_download_cut_midway_resumes_at_the_byte_it_reached(dev):
    # The first connection is cut after 1 MiB from the server: midway through an output of more than 2 MiB.
    cutting = Proxy(dev.target, cut_first_after=1 << 20)
    try:
        with Client(dev.target) as direct, Client(cutting.target) as client:
            job = direct.submit("invert", noise_png(1024, 768))
            (whole,) = direct.wait(job.id)
            assert len(whole.data) > 2 << 20
            data = client.download(job.id, whole.filename)
            assert client.reconnects == 1, "the cut must force one resume"
            assert cutting.accepted >= 2
            assert hashlib.sha256(data).hexdigest() == whole.sha256
            assert data == whole.data
    finally:
        cutting.close()


class _LyingJobs(rpc.JobServiceServicer):
    """A server breaking the contract: its download streams ``sent`` bytes of an output it says has
    ``announced`` (``None``: it never says)."""

    def __init__(self, announced, sent):
        self.announced, self.sent = announced, sent

    def DownloadOutput(self, request, context):
        offset = request.offset
        while offset < self.sent:
            chunk = pb.DownloadOutputResponse(offset=offset, data=b"\7" * min(1024, self.sent - offset))
            if offset == request.offset and self.announced is not None:
                chunk.output.CopyFrom(pb.Output(filename=request.filename, size_bytes=self.announced))
            yield chunk
            offset += len(chunk.data)


@pytest.mark.parametrize("announced", [3000, None])
def test_a_download_past_the_announced_size_or_without_one_is_refused(announced):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_JobServiceServicer_to_server(_LyingJobs(announced, sent=1 << 20), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", reconnect_for=0) as client:
            with pytest.raises(RpcError) as raised:
                client.download("01234567-89ab-7def-8123-456789abcdef", "out.png")
        assert raised.value.code == grpc.StatusCode.DATA_LOSS
        expected = "more than the 3000 bytes" if announced else "before the output's size"
        assert expected in str(raised.value), raised.value
        assert client.reconnects == 0
    finally:
        server.stop(None)

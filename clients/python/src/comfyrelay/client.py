"""A small typed wrapper over the generated stubs: ``submit``, ``stream`` (which resumes after a
disconnect from the last sequence received, so every event arrives once and in order), ``run`` (submit,
wait, return the outputs), and errors decoded from ``google.rpc`` details."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple, Union

import grpc

from comfyrelay.errors import JobFailed, RpcError
from comfyrelay.v1 import comfyrelay_pb2 as pb
from comfyrelay.v1 import comfyrelay_pb2_grpc as rpc

ImageLike = Union[bytes, str, os.PathLike]

_TERMINAL = ("succeeded", "failed", "cancelled")
# A cut connection, a restarting server, a stream reset: worth resuming.
_RESUMABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
)
# What a call safe to repeat is retried on: the server unavailable, or the connection cut.
_RETRIED_CALL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
_MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Output:
    """An output of a job, with its bytes."""

    filename: str
    mime_type: str
    width: int
    height: int
    sha256: str
    data: bytes
    node_id: str = ""
    path: Optional[pathlib.Path] = None


class _Reconnects:
    """The retry budget of a call or a resumable stream: backs off from 0.2 s to 5 s (with jitter) between
    attempts, and gives up once it has stayed broken for ``reconnect_for`` seconds with nothing received
    since."""

    def __init__(self, reconnect_for: float) -> None:
        self._reconnect_for = reconnect_for
        self.received()

    def received(self) -> None:
        """Something came: the stream is healthy again."""
        self._delay, self._broken_since = 0.2, None

    def broke(self, error: Optional[grpc.RpcError], ended_early: str = "") -> None:
        """Waits before the next attempt, or raises ``error`` (else ``ended_early``, as ``UNAVAILABLE``)
        once the budget is spent."""
        if self._broken_since is None:
            self._broken_since = time.monotonic()
        if time.monotonic() - self._broken_since > self._reconnect_for:
            if error is not None:
                raise RpcError.from_grpc(error) from error
            raise RpcError(grpc.StatusCode.UNAVAILABLE, ended_early)
        time.sleep(self._delay * (0.5 + random.random()))
        self._delay = min(self._delay * 2, 5.0)


def _image(value: ImageLike, filename: str = "") -> pb.InputImage:
    if isinstance(value, (bytes, bytearray)):
        return pb.InputImage(data=bytes(value), filename=filename)
    path = pathlib.Path(value)
    return pb.InputImage(data=path.read_bytes(), filename=filename or path.name)


def _param(value: Any) -> pb.ParameterValue:
    # bool first: it is an int in Python.
    if isinstance(value, bool):
        return pb.ParameterValue(bool_value=value)
    if isinstance(value, int):
        return pb.ParameterValue(int_value=value)
    if isinstance(value, float):
        return pb.ParameterValue(float_value=value)
    if isinstance(value, str):
        return pb.ParameterValue(string_value=value)
    if isinstance(value, (bytes, bytearray, os.PathLike)):
        return pb.ParameterValue(image_value=_image(value))
    raise TypeError(f"parameter values are bool, int, float, str, bytes or a path; got {type(value).__name__}")


class Client:
    """A connection to a comfyrelay server.

    Args:
        target: ``host:port`` of the gRPC server (default: ``$COMFYRELAY_SERVER`` or 127.0.0.1:50051).
        api_key: sent as ``authorization: Bearer <key>`` (default: ``$COMFYRELAY_API_KEY``).
        timeout: seconds for each unary call.
        reconnect_for: how long ``stream`` keeps trying to resume a broken stream, and the other calls
            to get through while the server is unavailable (a restart, a replica taking over).
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        reconnect_for: float = 60.0,
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        target = target or os.environ.get("COMFYRELAY_SERVER", "127.0.0.1:50051")
        target = target.split("://", 1)[-1]
        api_key = api_key if api_key is not None else os.environ.get("COMFYRELAY_API_KEY")
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                # Resume quickly after a lost connection (the default first backoff is 1 s).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._metadata: Tuple[Tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout
        self._reconnect_for = reconnect_for
        self.jobs = rpc.JobServiceStub(self._channel)
        self.workflows_stub = rpc.WorkflowServiceStub(self._channel)
        self.machines = rpc.MachineServiceStub(self._channel)
        #: How many times ``stream`` or ``download`` resumed after a disconnect.
        self.reconnects = 0
        #: How many times a call (``submit``, ``get``, ``cancel``, ``workflows``) was tried again while the
        #: server was unavailable.
        self.call_retries = 0

    def __repr__(self) -> str:
        return f"Client(authorized={bool(self._metadata)})"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        """One call that is safe to repeat (a read, a cancel, a submit with its idempotency key), retried
        while the server is unavailable or the connection breaks, backing off from 0.2 s to 5 s, for up to
        ``reconnect_for`` seconds (``call_retries`` counts retries)."""
        budget = _Reconnects(self._reconnect_for)
        while True:
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in _RETRIED_CALL:
                    raise RpcError.from_grpc(e) from e
                budget.broke(e)
            self.call_retries += 1

    def workflows(self) -> List[pb.Workflow]:
        """Every workflow in the catalog, with its typed inputs."""
        return list(self._call(self.workflows_stub.ListWorkflows, pb.ListWorkflowsRequest()).workflows)

    def submit(
        self,
        workflow: str,
        image: Optional[ImageLike] = None,
        *,
        prompt: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        request_id: str = "",
        priority: int = 0,
        labels: Optional[Mapping[str, str]] = None,
    ) -> pb.Job:
        """Submits a job and returns it (``QUEUED``) at once.

        ``image`` is bytes or a path; ``params`` values are typed by their Python type (bool, int, float,
        str; bytes or a path for image inputs). Without ``request_id`` a fresh one (``py-<uuid>``) is
        sent, so the submit is retried safely while the server is unavailable or the connection breaks
        (backing off from 0.2 s to 5 s, for up to ``reconnect_for`` seconds): a retry finds the job the
        first attempt made, never a second one.

        Raises:
            RpcError: e.g. ``INVALID_ARGUMENT`` with one field violation per problem; ``UNAVAILABLE``
                once ``reconnect_for`` has passed.
        """
        request = pb.SubmitJobRequest(
            workflow=workflow,
            prompt=prompt or "",
            parameters={k: _param(v) for k, v in (params or {}).items()},
            request_id=request_id or f"py-{uuid.uuid4()}",
            priority=priority,
            labels=dict(labels or {}),
        )
        if image is not None:
            request.image.CopyFrom(_image(image))
        return self._call(self.jobs.SubmitJob, request)

    def get(self, job_id: str) -> pb.Job:
        """The job's current state."""
        return self._call(self.jobs.GetJob, pb.GetJobRequest(job_id=job_id))

    def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        """Cancels the job (a finished job is returned as it is)."""
        return self._call(self.jobs.CancelJob, pb.CancelJobRequest(job_id=job_id, reason=reason))

    def stream(self, job_id: str, after_sequence: int = 0, *, skip_previews: bool = False) -> Iterator[pb.JobEvent]:
        """Yields the job's events after ``after_sequence`` until its terminal event.

        A lost connection is resumed from the last sequence received (backing off from 0.2 s to 5 s),
        so each event is yielded once, in order; once the stream has stayed broken for
        ``reconnect_for`` seconds (with no event since it broke), the last error is raised. A job that
        is merely silent never counts.

        Raises:
            RpcError: a non-resumable error (e.g. ``NOT_FOUND``), or the last one after ``reconnect_for``.
        """
        last = after_sequence
        budget = _Reconnects(self._reconnect_for)
        while True:
            request = pb.StreamJobRequest(job_id=job_id, after_sequence=last, skip_previews=skip_previews)
            try:
                for event in self.jobs.StreamJob(request, metadata=self._metadata):
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    budget.received()
                    yield event
                    if event.WhichOneof("kind") in _TERMINAL:
                        return
                # The server ended the stream early (it is draining): resume.
                error: Optional[grpc.RpcError] = None
            except grpc.RpcError as e:
                if e.code() not in _RESUMABLE:
                    raise RpcError.from_grpc(e) from e
                error = e
            budget.broke(error, "the event stream kept ending before the job did")
            self.reconnects += 1

    def download(self, job_id: str, filename: str) -> bytes:
        """The bytes of one output, streamed in chunks.

        A download cut midway (a restart, a replica going away) resumes at the byte it reached (backing
        off from 0.2 s to 5 s; ``reconnects`` counts resumes); once it has stayed broken for
        ``reconnect_for`` seconds, the last error is raised.

        Raises:
            RpcError: a non-resumable error (e.g. ``NOT_FOUND``), or the last one after ``reconnect_for``.
        """
        data = bytearray()
        size: Optional[int] = None
        budget = _Reconnects(self._reconnect_for)
        while True:
            request = pb.DownloadOutputRequest(job_id=job_id, filename=filename, offset=len(data))
            try:
                for chunk in self.jobs.DownloadOutput(request, metadata=self._metadata):
                    if chunk.offset != len(data):
                        raise RpcError(
                            grpc.StatusCode.DATA_LOSS,
                            f"{filename}: a chunk at byte {chunk.offset} where {len(data)} was expected",
                        )
                    if chunk.HasField("output"):
                        size = chunk.output.size_bytes
                    if size is None:
                        # The server names the output in the first message of every download: without its
                        # size, nothing would bound the stream.
                        raise RpcError(grpc.StatusCode.DATA_LOSS, f"{filename}: a chunk before the output's size")
                    if len(data) + len(chunk.data) > size:
                        raise RpcError(grpc.StatusCode.DATA_LOSS, f"{filename}: more than the {size} bytes announced")
                    data += chunk.data
                    budget.received()
                if size is not None and len(data) >= size:
                    return bytes(data)
                # The server ended the download early (it is draining): resume.
                error: Optional[grpc.RpcError] = None
            except grpc.RpcError as e:
                if e.code() not in _RESUMABLE:
                    raise RpcError.from_grpc(e) from e
                error = e
            budget.broke(error, f"the download of {filename} kept ending early")
            self.reconnects += 1

    def run(
        self,
        workflow: str,
        image: Optional[ImageLike] = None,
        *,
        out_dir: Optional[Union[str, os.PathLike]] = None,
        **submit: Any,
    ) -> List[Output]:
        """Submits, waits for the end, and returns the outputs with their bytes (checked against their
        SHA-256); with ``out_dir``, also saves them there.

        Raises:
            JobFailed: the job ended ``FAILED`` or ``CANCELLED``.
            RpcError: a call failed.
        """
        job = self.submit(workflow, image, **submit)
        return self.wait(job.id, out_dir=out_dir)

    def wait(self, job_id: str, *, out_dir: Optional[Union[str, os.PathLike]] = None) -> List[Output]:
        """Follows the job to its end and returns its outputs (see ``run``)."""
        for event in self.stream(job_id, skip_previews=True):
            kind = event.WhichOneof("kind")
            if kind == "succeeded":
                return [self._fetch(job_id, o, out_dir) for o in event.succeeded.outputs]
            if kind == "failed":
                error = event.failed.error
                reason = pb.FailureReason.Name(error.reason).removeprefix("FAILURE_REASON_")
                raise JobFailed(job_id, "failed", reason, error.message, list(error.node_errors))
            if kind == "cancelled":
                raise JobFailed(job_id, "cancelled", "CANCELLED", event.cancelled.reason)
        raise RpcError(grpc.StatusCode.UNKNOWN, f"the stream of job {job_id} ended without a terminal event")

    def _fetch(self, job_id: str, o: pb.Output, out_dir: Optional[Union[str, os.PathLike]]) -> Output:
        inline = o.size_bytes > 0 and len(o.inline_data) == o.size_bytes
        data = o.inline_data if inline else self.download(job_id, o.filename)
        if o.sha256 and hashlib.sha256(data).hexdigest() != o.sha256:
            raise RpcError(grpc.StatusCode.DATA_LOSS, f"{o.filename}: the bytes do not match their SHA-256")
        path = None
        if out_dir is not None:
            name = pathlib.PurePath(o.filename).name
            if name in ("", ".", ".."):
                raise RpcError(grpc.StatusCode.DATA_LOSS, f"output file name {o.filename!r} is not a file name")
            directory = pathlib.Path(out_dir)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / name
            part = directory / f".{name}.part"
            part.write_bytes(data)
            part.replace(path)
        return Output(o.filename, o.mime_type, o.width, o.height, o.sha256, data, o.node_id, path)

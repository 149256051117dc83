"""Errors with the server's ``google.rpc`` details decoded (AIP-193): field violations, the error's
reason and metadata, and how long to wait before retrying."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ComfyRelayError(Exception):
    """Base class of this package's errors."""


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class RpcError(ComfyRelayError):
    """A call failed: the status code and message, with the decoded details.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the server's message.
        field_violations: from a ``google.rpc.BadRequest`` (one per problem, all at once).
        reason, domain, metadata: from a ``google.rpc.ErrorInfo``.
        retry_delay: seconds, from a ``google.rpc.RetryInfo``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Optional[List[FieldViolation]] = None,
        reason: str = "",
        domain: str = "",
        metadata: Optional[Dict[str, str]] = None,
        retry_delay: Optional[float] = None,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = field_violations or []
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.retry_delay = retry_delay
        super().__init__(self._describe())

    def _describe(self) -> str:
        lines = [f"{self.code.name}: {self.message}"]
        lines += [f"  field `{v.field}`: {v.description}" for v in self.field_violations]
        if self.reason:
            lines.append(f"  reason: {self.reason} ({self.domain})")
        if self.retry_delay is not None:
            lines.append(f"  retry after {self.retry_delay:g}s")
        return "\n".join(lines)

    @classmethod
    def from_grpc(cls, error: grpc.RpcError) -> "RpcError":
        """Decodes a ``grpc.RpcError`` (its ``grpc-status-details-bin`` trailer)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        violations: List[FieldViolation] = []
        reason = domain = ""
        metadata: Dict[str, str] = {}
        retry_delay = None
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        for detail in status.details if status is not None else []:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                violations += [FieldViolation(v.field, v.description) for v in br.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(
            code,
            message or "",
            field_violations=violations,
            reason=reason,
            domain=domain,
            metadata=metadata,
            retry_delay=retry_delay,
        )


class JobFailed(ComfyRelayError):
    """The job ended ``FAILED`` or ``CANCELLED``.

    Attributes:
        job_id: the job.
        state: ``"failed"`` or ``"cancelled"``.
        reason: the ``FailureReason`` name (e.g. ``"EXECUTION"``), or ``"CANCELLED"``.
        message: why.
        node_errors: ComfyUI's per-node errors (``comfyrelay.v1.NodeError`` messages).
    """

    def __init__(self, job_id: str, state: str, reason: str, message: str, node_errors: Optional[list] = None) -> None:
        self.job_id = job_id
        self.state = state
        self.reason = reason
        self.message = message
        self.node_errors = list(node_errors or [])
        super().__init__(f"job {job_id} {state} ({reason}): {message}")

"""Python client for comfyrelay, a gRPC service that runs ComfyUI workflows durably.

>>> from comfyrelay import Client
>>> with Client("127.0.0.1:50051") as client:
...     outputs = client.run("invert", image="photo.png")

The generated stubs are in ``comfyrelay.v1`` (``comfyrelay_pb2``, ``comfyrelay_pb2_grpc``).
"""

from comfyrelay.client import Client, Output
from comfyrelay.errors import ComfyRelayError, FieldViolation, JobFailed, RpcError

__all__ = ["Client", "ComfyRelayError", "FieldViolation", "JobFailed", "Output", "RpcError"]

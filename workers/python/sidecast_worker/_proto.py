"""The generated envelope messages, and the protocol constants built on them.

envelope_pb2 is generated from proto/sidecast/v1/envelope.proto at build
time (workers/python/CMakeLists.txt puts it in <build>/python); it is never
committed, so a stale copy cannot drift from the schema.
"""
import enum

try:
    from sidecast.v1 import envelope_pb2 as pb
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sidecast_worker needs the generated module sidecast.v1.envelope_pb2: build the "
        "project (it lands in <build>/python) and put that directory on PYTHONPATH, or run "
        "`protoc -I proto --python_out=OUT proto/sidecast/v1/envelope.proto` and add OUT"
    ) from e

#: Major version of the wire protocol this SDK speaks (Hello.protocol_version).
PROTOCOL_VERSION = 1


class Code(enum.IntEnum):
    """Outcome codes of Reply, Error and Cancel (``sidecast.v1.Code``)."""

    OK = 0
    UNAVAILABLE = 1
    TIMEOUT = 2
    BUSY = 3
    WORKER_LOST = 4
    REFUSED = 5
    BAD_REQUEST = 6
    UNSUPPORTED_VERSION = 7
    NOT_REGISTERED = 8
    INTERNAL = 9
    CANCELLED = 10
    BROKER_LOST = 11
    STANDBY = 12


def code_of(value):
    """A wire code as Code; unknown numbers (a newer peer) stay plain ints."""
    try:
        return Code(value)
    except ValueError:
        return value


def code_name(value):
    """``"TIMEOUT"`` for 2; the number itself for codes this SDK does not know."""
    code = code_of(value)
    return code.name if isinstance(code, Code) else str(code)

__all__ = ["PROTOCOL_VERSION", "Code", "code_name", "code_of", "pb"]

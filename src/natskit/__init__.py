"""natskit: real-time distributed systems on NATS, as declarations on one ``App``."""

from natskit.app import App
from natskit.connection import Backoff, ConnectOptions, TLSOptions
from natskit.errors import (
    CodecError,
    ConnectError,
    ConnectionClosed,
    DecodeError,
    HandlerError,
    NatskitError,
    PayloadTooLarge,
    PermissionDenied,
    Reject,
    Retry,
    ServerError,
    ServerNotFound,
    ServerStartError,
)
from natskit.message import Delivery, Message
from natskit.pipeline import Middleware, Next

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "CodecError",
    "ConnectError",
    "ConnectOptions",
    "ConnectionClosed",
    "DecodeError",
    "Delivery",
    "HandlerError",
    "Message",
    "Middleware",
    "NatskitError",
    "Next",
    "PayloadTooLarge",
    "PermissionDenied",
    "Reject",
    "Retry",
    "ServerError",
    "ServerNotFound",
    "ServerStartError",
    "TLSOptions",
    "__version__",
]

"""natskit: real-time distributed systems on NATS, as declarations on one ``App``."""

from natskit.app import App
from natskit.connection import Backoff, ConnectOptions, TLSOptions
from natskit.errors import (
    CircuitOpen,
    CodecError,
    ConnectError,
    ConnectionClosed,
    DecodeError,
    HandlerError,
    NatskitError,
    NoResponders,
    PayloadTooLarge,
    PermissionDenied,
    Reject,
    RequestError,
    RequestTimeout,
    Retry,
    ServerError,
    ServerNotFound,
    ServerStartError,
    ServiceError,
)
from natskit.message import Delivery, Message
from natskit.pipeline import Middleware, Next
from natskit.resilience import BreakerPolicy, BreakerState, CircuitBreaker, RetryPolicy
from natskit.rpc import CallPolicy, Replies, remaining_time

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "BreakerPolicy",
    "BreakerState",
    "CallPolicy",
    "CircuitBreaker",
    "CircuitOpen",
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
    "NoResponders",
    "PayloadTooLarge",
    "PermissionDenied",
    "Reject",
    "Replies",
    "RequestError",
    "RequestTimeout",
    "Retry",
    "RetryPolicy",
    "ServerError",
    "ServerNotFound",
    "ServerStartError",
    "ServiceError",
    "TLSOptions",
    "__version__",
    "remaining_time",
]

"""The JetStream API over a nats-py connection: JSON requests, errors, reconciling.

natskit talks to the ``$JS.API`` subjects directly rather than through nats-py's
JetStream manager, so the configurations sent are exactly the ones built (and compared)
in :mod:`natskit.streams.specs`, and every server error is translated here, once, into
the :class:`~natskit.errors.StreamError` tree.

Reconciling a declared stream: absent, it is created; present and equal in every
declared field, it is left alone; otherwise it is updated, unless a field the server
cannot change differs, which raises :class:`~natskit.errors.SpecConflict` naming the
field, the server's value and the declared one. Subjects overlapping another stream
raise :class:`~natskit.errors.SubjectsOverlap` naming both streams. Consumers are
reconciled the same way.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import nats.errors

from natskit.errors import (
    ConnectionClosed,
    JetStreamApiError,
    SpecConflict,
    StreamError,
    StreamNotFound,
    SubjectsOverlap,
)
from natskit.streams.specs import (
    CONSUMER_FIXED,
    ConsumerSpec,
    StoredMessage,
    StreamSpec,
    consumer_differences,
    patterns_overlap,
    stored_from_api,
    stream_differences,
    stream_fixed_conflict,
)

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["JetStreamApi", "ensure_consumer", "ensure_stream"]

log = logging.getLogger("natskit.streams")

STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
SUBJECTS_OVERLAP = 10065
MESSAGE_NOT_FOUND = 10037


class JetStreamApi:
    """Requests to the JetStream API of one account, on one connection."""

    def __init__(self, nc: Client, *, prefix: str = "$JS.API", timeout: float = 5.0):
        self.nc = nc
        self.prefix = prefix
        self.timeout = timeout

    async def request(self, suffix: str, body: Any = None) -> dict[str, Any]:
        """Send ``body`` (JSON) to ``$JS.API.<suffix>``; the reply, or a StreamError."""
        subject = f"{self.prefix}.{suffix}"
        data = b"" if body is None else json.dumps(body).encode()
        try:
            reply = await self.nc.request(subject, data, timeout=self.timeout)
        except nats.errors.NoRespondersError:
            raise StreamError(
                f"JetStream is not available ({suffix}: no responders); is it enabled "
                "on the server?"
            ) from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise StreamError(
                f"JetStream {suffix}: no reply within {self.timeout}s"
            ) from None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
        ) as exc:
            raise ConnectionClosed(f"JetStream {suffix}: {exc}") from None
        answer: dict[str, Any] = json.loads(reply.data) if reply.data else {}
        error = answer.get("error")
        if error:
            raise JetStreamApiError(
                suffix,
                str(error.get("description", "")),
                code=int(error.get("code", 0)),
                err_code=int(error.get("err_code", 0)),
            )
        return answer

    # -- streams ----------------------------------------------------------------------

    async def stream_info(self, name: str) -> dict[str, Any]:
        try:
            return await self.request(f"STREAM.INFO.{name}")
        except JetStreamApiError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                raise StreamNotFound(name) from None
            raise

    async def streams(self) -> list[dict[str, Any]]:
        """Every stream's info (all pages)."""
        found: list[dict[str, Any]] = []
        while True:
            page = await self.request("STREAM.LIST", {"offset": len(found)})
            batch = page.get("streams") or []
            found.extend(batch)
            if not batch or len(found) >= int(page.get("total", 0)):
                return found

    async def create_stream(self, config: dict[str, Any]) -> dict[str, Any]:
        return await self.request(f"STREAM.CREATE.{config['name']}", config)

    async def update_stream(self, config: dict[str, Any]) -> dict[str, Any]:
        return await self.request(f"STREAM.UPDATE.{config['name']}", config)

    async def delete_stream(self, name: str) -> None:
        await self.request(f"STREAM.DELETE.{name}")

    async def purge_stream(self, name: str, *, subject: str | None = None) -> int:
        body = {"filter": subject} if subject else None
        answer = await self.request(f"STREAM.PURGE.{name}", body)
        return int(answer.get("purged", 0))

    async def get_message(self, stream: str, sequence: int) -> StoredMessage:
        try:
            answer = await self.request(f"STREAM.MSG.GET.{stream}", {"seq": sequence})
        except JetStreamApiError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                raise StreamNotFound(stream) from None
            if exc.err_code == MESSAGE_NOT_FOUND:
                raise StreamError(
                    f"stream {stream!r} holds no message at sequence {sequence}"
                ) from None
            raise
        return stored_from_api(stream, answer["message"])

    async def delete_message(self, stream: str, sequence: int) -> None:
        await self.request(f"STREAM.MSG.DELETE.{stream}", {"seq": sequence})

    # -- consumers --------------------------------------------------------------------

    async def consumer_info(self, stream: str, name: str) -> dict[str, Any]:
        try:
            return await self.request(f"CONSUMER.INFO.{stream}.{name}")
        except JetStreamApiError as exc:
            if exc.err_code in (CONSUMER_NOT_FOUND, STREAM_NOT_FOUND):
                raise StreamNotFound(stream, name) from None
            raise

    async def consumers(self, stream: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            page = await self.request(f"CONSUMER.LIST.{stream}", {"offset": len(found)})
            batch = page.get("consumers") or []
            found.extend(batch)
            if not batch or len(found) >= int(page.get("total", 0)):
                return found

    async def create_consumer(
        self, stream: str, config: dict[str, Any], *, action: str = ""
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"stream_name": stream, "config": config}
        if action:
            body["action"] = action
        name = config.get("durable_name") or config.get("name")
        suffix = f"CONSUMER.CREATE.{stream}" + (f".{name}" if name else "")
        try:
            return await self.request(suffix, body)
        except JetStreamApiError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                raise StreamNotFound(stream) from None
            raise

    async def delete_consumer(self, stream: str, name: str) -> None:
        await self.request(f"CONSUMER.DELETE.{stream}.{name}")


# -- reconciling ----------------------------------------------------------------------


async def ensure_stream(
    api: JetStreamApi, spec: StreamSpec, *, update: bool = True
) -> dict[str, Any]:
    """Create ``spec``'s stream, or bring the existing one in line (see module doc)."""
    wanted = spec.config()
    try:
        info = await api.stream_info(spec.name)
    except StreamNotFound:
        try:
            created = await api.create_stream(wanted)
        except JetStreamApiError as exc:
            if exc.err_code == SUBJECTS_OVERLAP:
                await _raise_overlap(api, spec)
            raise
        log.info("stream %s created (subjects %s)", spec.name, ", ".join(spec.subjects))
        return created
    changes = stream_differences(wanted, info.get("config", {}))
    if not changes or not update:
        return info
    fixed = stream_fixed_conflict(changes)
    if fixed is not None:
        raise SpecConflict(*fixed, stream=spec.name)
    merged = {**info.get("config", {}), **wanted}
    try:
        updated = await api.update_stream(merged)
    except JetStreamApiError as exc:
        if exc.err_code == SUBJECTS_OVERLAP:
            await _raise_overlap(api, spec)
        key, old, new = changes[0] if len(changes) == 1 else _several(changes)
        raise SpecConflict(
            key, old, new, stream=spec.name, reason=exc.description
        ) from None
    log.info(
        "stream %s updated: %s",
        spec.name,
        ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes),
    )
    return updated


def _several(changes: list[tuple[str, Any, Any]]) -> tuple[str, Any, Any]:
    keys = "/".join(key for key, _, _ in changes)
    return keys, [old for _, old, _ in changes], [new for _, _, new in changes]


async def _raise_overlap(api: JetStreamApi, spec: StreamSpec) -> None:
    for info in await api.streams():
        config = info.get("config", {})
        if config.get("name") == spec.name:
            continue
        for theirs in config.get("subjects") or []:
            for ours in spec.subjects:
                if patterns_overlap(ours, theirs):
                    raise SubjectsOverlap(spec.name, ours, config["name"], theirs)


async def ensure_consumer(api: JetStreamApi, spec: ConsumerSpec) -> dict[str, Any]:
    """Create ``spec``'s durable consumer, or update it where the server allows."""
    wanted = spec.config()
    try:
        info = await api.consumer_info(spec.stream, spec.durable)
    except StreamNotFound as exc:
        if exc.consumer is None:
            raise
        try:
            created = await api.create_consumer(spec.stream, wanted, action="create")
        except StreamNotFound:
            raise StreamNotFound(spec.stream) from None
        log.info("consumer %s on stream %s created", spec.durable, spec.stream)
        return created
    changes = consumer_differences(wanted, info.get("config", {}))
    if not changes:
        return info
    for key, old, new in changes:
        if key in CONSUMER_FIXED:
            raise SpecConflict(key, old, new, stream=spec.stream, consumer=spec.durable)
    try:
        updated = await api.create_consumer(spec.stream, wanted, action="update")
    except JetStreamApiError as exc:
        key, old, new = changes[0] if len(changes) == 1 else _several(changes)
        raise SpecConflict(
            key,
            old,
            new,
            stream=spec.stream,
            consumer=spec.durable,
            reason=exc.description,
        ) from None
    log.info(
        "consumer %s on stream %s updated: %s",
        spec.durable,
        spec.stream,
        ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes),
    )
    return updated

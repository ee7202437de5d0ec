"""The reference system: an e-commerce order flow on all five patterns.

=============  =============================================  ==========================
service        what it does                                   pattern
=============  =============================================  ==========================
gateway        HTTP ``POST /orders``, ``GET /orders/{id}``    request-reply (caller)
orders         validates, reserves, charges, stores, emits    request-reply, streams,
                                                              publish-subscribe
inventory      stock in a JetStream key-value bucket          request-reply
payment        a flaky provider behind a circuit breaker      request-reply
logistics      reads the order stream, plans shipments        streaming pipeline
shipper        ships, several worker processes                durable work queue
notification   subscribes to ``events.order.*``               publish-subscribe fan-out
monitor        the registry, watching every instance          discovery and health
=============  =============================================  ==========================

``natskit demo`` runs it (:func:`natskit.demo.run.run_demo`); each service is an App in
:mod:`natskit.demo.services` or :mod:`natskit.demo.gateway`, run by ``natskit run``.
"""

"""An App with no security settings in its code, for the ``natskit run`` security tests.

Credentials and TLS come from the command line and the environment only; on start it
announces itself on ``secured.ready`` so the test knows it connected.
"""

from __future__ import annotations

import os

from natskit import App

app = App("secured", version="1.0.0")


@app.on_start
async def announce() -> None:
    await app.publish("secured.ready", {"pid": os.getpid()}, confirm=True)

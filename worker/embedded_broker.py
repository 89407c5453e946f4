"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled often.

Kombu hands the sqla transport's options to `create_engine`, so its polling interval
cannot be set as an option; a subclass sets it instead.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Transport


class EmbeddedTransport(Transport):
    """Polls the queue table every 50 ms, so an idle worker picks new work up at once."""

    polling_interval = 0.05

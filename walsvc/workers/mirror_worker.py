"""A mirror worker: publishes every committed record of the log to a JetStream stream, exactly once.

Copy this to run the mirror inside your own supervisor: a `walsvc.mirror.Mirror` with a
`walsvc.jetstream.JetStreamSink` is the whole of `walsvc mirror`.  Kill it at any moment and start it
again: it resumes from its named cursor and JetStream drops the resent messages by id.  Another sink (Kafka)
is another class with the `walsvc.mirror.Sink` shape passed here instead.

    python -m walsvc.workers.mirror_worker --dir wal-data --servers nats://127.0.0.1:4222 --stream WAL --create
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from walsvc.jetstream import JetStreamSink
from walsvc.mirror import Mirror, MirrorState


def run(directory: str, *, servers: list[str], stream: str, subject: str | None = None, create: bool = False,
        replicas: int = 3, packed: bool = False, name: str = "mirror") -> MirrorState:
    """Mirror until SIGTERM/SIGINT; returns the final state (mirrored LSN, errors, lag)."""
    sink = JetStreamSink(servers, stream, subject or f"walsvc.{stream}", create=create, replicas=replicas)
    mirror = Mirror(directory, sink, name=name, packed=packed)

    async def main() -> MirrorState:
        mirror.install_signal_handlers()
        return await mirror.run()

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="wal-data")
    parser.add_argument("--servers", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject")
    parser.add_argument("--create", action="store_true")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--name", default="mirror")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mirror %(levelname)s %(message)s")
    state = run(args.dir, servers=args.servers.split(","), stream=args.stream, subject=args.subject,
                create=args.create, replicas=args.replicas, packed=args.packed, name=args.name)
    print(f"mirrored_lsn={state.mirrored_lsn} publish_errors={state.publish_errors}")


if __name__ == "__main__":
    main()

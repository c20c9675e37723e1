"""Sidecast worker SDK for Python: serve Socket.IO events behind a Sidecast broker.

    from sidecast_worker import Worker, Service

    svc = Service("demo", capacity=8)

    @svc.on("echo")
    def echo(req):
        req.reply(*req.args)

    Worker(broker="tcp://127.0.0.1:7700", publish="tcp://127.0.0.1:7701").add(svc).run()

Speaks the internal wire protocol of docs/protocol.md, like the C++ SDK in
workers/sdk/. See workers/python/README.md.
"""
from ._proto import PROTOCOL_VERSION, Code
from .codec import namespace_topic, room_topic
from .request import CONNECT, DISCONNECT, EVENT, GatewayGone, Request, SocketState, Welcome
from .service import Service
from .worker import AckResult, DeliveryReport, Worker, WorkerStats

__all__ = [
    "AckResult", "CONNECT", "Code", "DISCONNECT", "DeliveryReport", "EVENT", "GatewayGone",
    "PROTOCOL_VERSION", "Request", "Service", "SocketState", "Welcome", "Worker", "WorkerStats",
    "namespace_topic", "room_topic",
]

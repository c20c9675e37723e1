#!/usr/bin/python3
"""The python-socketio peer: Debian's python3-socketio served by eventlet,
the stack this project's users come from, implementing the app contract of
docs/services.md that bench/ needs (echo, echo-bin, whoami, join, leave,
say -> said, bye; /forbidden refused).

    /usr/bin/python3 server.py [--http HOST:PORT] [--ping-interval MS] [--ping-timeout MS]
                               [--max-clients N]

Not served: call-me-back (python-socketio has no way to answer an event's
ack later from another event's ack without blocking the handler).
The first line on stdout is `listening on http://HOST:PORT`.
"""
import argparse
import sys

import eventlet
import eventlet.wsgi

eventlet.monkey_patch()

import socketio  # noqa: E402  (after monkey patching, as eventlet requires)


def options():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT to listen on")
    p.add_argument("--ping-interval", type=int, default=25000, help="ms")
    p.add_argument("--ping-timeout", type=int, default=20000, help="ms")
    # eventlet.wsgi serves at most this many connections at once (its own
    # default is 1024); a WebSocket holds one for its whole life.
    p.add_argument("--max-clients", type=int, default=1024, help="concurrent connections (eventlet.wsgi max_size)")
    return p.parse_args()


def serve_demo(sio, nsp):
    @sio.on("connect", namespace=nsp)
    def connect(sid, environ, auth=None):
        sio.save_session(sid, {"auth": auth if auth is not None else {}}, namespace=nsp)

    @sio.on("echo", namespace=nsp)
    def echo(sid, *args):
        return args  # a tuple: the ack carries every argument, in order

    @sio.on("echo-bin", namespace=nsp)
    def echo_bin(sid, *args):
        return args

    @sio.on("whoami", namespace=nsp)
    def whoami(sid, *args):
        auth = sio.get_session(sid, namespace=nsp).get("auth", {})
        return {"sid": sid, "nsp": nsp, "auth": auth}

    @sio.on("join", namespace=nsp)
    def join(sid, room=None, *rest):
        if not isinstance(room, str):
            return None
        sio.enter_room(sid, room, namespace=nsp)
        return room

    @sio.on("leave", namespace=nsp)
    def leave(sid, room=None, *rest):
        if not isinstance(room, str):
            return None
        sio.leave_room(sid, room, namespace=nsp)
        return room

    @sio.on("say", namespace=nsp)
    def say(sid, message=None, *rest):
        if not isinstance(message, dict) or not isinstance(message.get("room"), str):
            return None
        sio.emit("said", {"room": message["room"], "text": message.get("text"), "from": sid},
                 room=message["room"], namespace=nsp)
        return True

    @sio.on("bye", namespace=nsp)
    def bye(sid, *args):
        sio.disconnect(sid, namespace=nsp)


def main():
    o = options()
    host, _, port = o.http.rpartition(":")
    sio = socketio.Server(
        async_mode="eventlet",
        ping_interval=o.ping_interval / 1000.0,
        ping_timeout=o.ping_timeout / 1000.0,
        cors_allowed_origins=None,
        # python-engineio's defaults stay: max_http_buffer_size 1,000,000
        # bytes (the same payload limit as socket.io and Sidecast).
    )
    serve_demo(sio, "/")
    serve_demo(sio, "/custom")

    @sio.on("connect", namespace="/forbidden")
    def forbidden(sid, environ, auth=None):
        raise socketio.exceptions.ConnectionRefusedError("forbidden")

    app = socketio.WSGIApp(sio)
    listener = eventlet.listen((host or "127.0.0.1", int(port)), backlog=511)
    print(f"listening on http://{host}:{listener.getsockname()[1]}", flush=True)
    eventlet.wsgi.server(listener, app, log_output=False, max_size=o.max_clients)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)

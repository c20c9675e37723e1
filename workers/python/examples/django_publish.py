"""Emit to one Socket.IO client from a Django view, through the gateway's publish API,
put a client in a room (Flask-SocketIO's join_room(room, sid=sid)) through its
sockets API, and close a whole room (Flask-SocketIO's close_room(room)) through
its rooms API.

No worker needed: any backend can POST /api/v1/publish, /api/v1/sockets/ and
/api/v1/rooms/ (docs/gateway.md).
Standard library only; settings come from the environment here to keep the
example self-contained (SIDECAST_GATEWAY=http://127.0.0.1:8080,
SIDECAST_API_KEY=<a key given to sidecast-gateway --api-key>).
"""
import json
import os
import urllib.parse
import urllib.request

GATEWAY = os.environ.get("SIDECAST_GATEWAY", "http://127.0.0.1:8080")
API_KEY = os.environ.get("SIDECAST_API_KEY", "")


def publish(message, timeout=5):
    """POSTs one publish message ({"sid"|"room"|"broadcast", "event", "data"|"args", ...})."""
    req = urllib.request.Request(
        f"{GATEWAY}/api/v1/publish", data=json.dumps(message).encode(), method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # raises HTTPError on 4xx/5xx
        return resp.status  # 202: the gateway queued it


def sockets(sid, action, body=None, timeout=5):
    """POSTs /api/v1/sockets/{sid}/{action} (join, leave, disconnect); answered once done."""
    req = urllib.request.Request(
        f"{GATEWAY}/api/v1/sockets/{urllib.parse.quote(sid, safe='')}/{action}",
        data=json.dumps(body or {}).encode(), method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # raises HTTPError: 404 unknown sid, ...
        return resp.status  # 200: done; a publish to the room from now on reaches the socket


def rooms(action, body, timeout=5):
    """POSTs /api/v1/rooms/{action} (join, leave, disconnect) for every socket in a
    room ({"room": ...}) or a namespace ({"broadcast": true}) on every gateway."""
    req = urllib.request.Request(
        f"{GATEWAY}/api/v1/rooms/{action}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # raises HTTPError on 4xx/5xx
        return resp.status  # 202: on its way to every gateway with a member, after earlier room publishes


def report_ready(request, sid):
    """A Django view: tell the browser whose Socket.IO sid is in the URL that its report is ready."""
    from django.http import JsonResponse  # imported here so this file runs without Django

    # No "nsp": a sid's event goes to the namespace its socket is in.
    status = publish({"sid": sid, "event": "report_ready",
                      "data": {"url": f"/reports/{request.GET.get('id', '')}"}})
    return JsonResponse({"queued": status == 202})


def logged_in(request, sid):
    """A Django view, after a login: the user's Socket.IO socket joins the room
    "user:<id>", which every later notice for that user is published to."""
    from django.http import JsonResponse

    room = f"user:{request.user.id}"
    sockets(sid, "join", {"room": room})
    publish({"room": room, "event": "welcome", "data": {"user": request.user.username}})
    return JsonResponse({"room": room})


def game_over(request, game_id):
    """A Django view: the game's last word to its room, then the room is closed
    (everyone in it leaves it; the sockets stay connected)."""
    from django.http import JsonResponse

    room = f"game:{game_id}"
    publish({"room": room, "nsp": "/", "event": "game_over", "data": {"game": game_id}})
    # Published behind the game_over, so that arrives first: when both reach the
    # same gateway. Behind a balancer that spreads requests (no sticky
    # sessions), point SIDECAST_GATEWAY at one gateway for pairs like this.
    rooms("leave", {"room": room, "nsp": "/"})
    return JsonResponse({"closed": room})

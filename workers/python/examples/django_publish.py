"""Emit to one Socket.IO client from a Django view, through the gateway's publish API.

No worker needed: any backend can POST /api/v1/publish (docs/gateway.md).
Standard library only; settings come from the environment here to keep the
example self-contained (SIDECAST_GATEWAY=http://127.0.0.1:8080,
SIDECAST_API_KEY=<a key given to sidecast-gateway --api-key>).
"""
import json
import os
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


def report_ready(request, sid):
    """A Django view: tell the browser whose Socket.IO sid is in the URL that its report is ready."""
    from django.http import JsonResponse  # imported here so this file runs without Django

    # No "nsp": a sid's event goes to the namespace its socket is in.
    status = publish({"sid": sid, "event": "report_ready",
                      "data": {"url": f"/reports/{request.GET.get('id', '')}"}})
    return JsonResponse({"queued": status == 202})

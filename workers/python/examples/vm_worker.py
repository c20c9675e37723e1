#!/usr/bin/python3
"""The `vm` service (namespace /vm) in Python: a port of workers/vm/vm.cpp.

Launches VMs — long tasks that report progress to the asking socket and end
with a result. Simulated, with a configurable launch time and failure rate;
the shape is what matters: ack at once, progress events, a final
vm_response, cancellation, failures reported rather than swallowed.

  open_vm {count, name} (ack)  -> ack {task_id}    name: at most 64 characters
    vm_progress {task_id, vm, state, percent}   state: queued, provisioning,
                                                 booting, running, failed, cancelled
    vm_response {task_id, data: [{vm, state, ip?}], failed, cancelled, worker}
  cancel_vm {task_id} (ack)   -> ack {task_id, cancelled: true|false}

    python3 vm_worker.py --broker tcp://127.0.0.1:7700 --publish tcp://127.0.0.1:7701 \\
        --launch-ms 1000 --failure-rate 0
"""
import argparse
import logging
import os
import random
import secrets
import sys
import threading
import time

from sidecast_worker import Code, Service, SocketState, Worker

STEPS = 10  # progress events per VM, 10% each
SLICE = 0.05  # seconds: how quickly a cancel_vm takes effect
MAX_NAME = 64  # characters of open_vm's name


def state_at(step):
    if step == 0:
        return "queued"
    if step <= 4:
        return "provisioning"
    if step < STEPS:
        return "booting"
    return "running"


class Task:
    def __init__(self, owner):
        self.owner = owner  # the sid that launched it: only it may cancel
        self.cancelled = threading.Event()


def vm_service(capacity=16, launch_time=4.0, failure_rate=0.1, max_count=20):
    svc = Service("vm", capacity)
    tasks = {}  # task id -> Task, so cancel_vm can reach them
    lock = threading.Lock()

    @svc.on("open_vm")
    def open_vm(req):
        spec = req.args[0] if req.args and isinstance(req.args[0], dict) else {}
        count, name = 1, "vm"
        if "count" in spec:
            c = spec["count"]
            count = c if isinstance(c, int) and not isinstance(c, bool) else -1
        if "name" in spec:
            name = spec["name"]
            # Not a string, or one that is not UTF-8 (a lone surrogate the
            # client escaped): refused, as in workers/vm/vm.cpp (the second
            # made every event of the task fail to encode after its ack).
            try:
                if not isinstance(name, str):
                    raise TypeError
                name.encode("utf-8")
            except (TypeError, UnicodeEncodeError):
                req.fail(Code.BAD_REQUEST, f"name must be a string of at most {MAX_NAME} characters")
                return
        if not 1 <= count <= max_count:
            req.fail(Code.BAD_REQUEST, f"count must be 1..{max_count}")
            return
        # Every progress event and the final answer carry it (count times):
        # bounded, as in workers/vm/vm.cpp.
        if len(name) > MAX_NAME:
            req.fail(Code.BAD_REQUEST, f"name must be at most {MAX_NAME} characters")
            return
        task_id = "t-" + secrets.token_hex(6)
        task = Task(req.sid)
        with lock:
            tasks[task_id] = task
        try:
            req.ack({"task_id": task_id})
            launch(req, task_id, task, count, name)
        finally:
            with lock:  # launch() took it out already, unless it raised
                tasks.pop(task_id, None)

    def launch(req, task_id, task, count, name):
        # Each VM fails at a random step with probability failure_rate.
        vms = [{"vm": f"{name}-{i + 1}",
                "fails_at": random.randint(2, STEPS - 1) if random.random() < failure_rate else STEPS + 1,
                "state": "queued", "percent": 0, "done": False}
               for i in range(count)]

        def progress(v):
            req.emit("vm_progress", {"task_id": task_id, "vm": v["vm"], "state": v["state"],
                                     "percent": v["percent"]})

        step_time = launch_time / STEPS
        cancelled = False
        for step in range(STEPS + 1):
            if step > 0:
                # Sleep in slices so a cancel_vm takes effect quickly.
                until = time.monotonic() + step_time
                while (left := until - time.monotonic()) > 0:
                    if not req.sleep(min(left, SLICE)) or task.cancelled.is_set():
                        cancelled = True
                        break
                if cancelled:
                    break
            for v in vms:
                if v["done"]:
                    continue
                if step == v["fails_at"]:
                    v["state"], v["done"] = "failed", True
                else:
                    v["state"], v["percent"] = state_at(step), step * 100 // STEPS
                    v["done"] = step == STEPS
                progress(v)

        # Ended: a cancel_vm from here on finds no task (cancelled: false);
        # one that found it after the last look above said true, so the
        # task ends cancelled, each VM in the state it reached.
        with lock:
            tasks.pop(task_id, None)
            cancelled = cancelled or task.cancelled.is_set()
        data, failed = [], 0
        for v in vms:
            if not v["done"]:
                v["state"], v["done"] = "cancelled", True
                progress(v)
            result = {"vm": v["vm"], "state": v["state"]}
            if v["state"] == "running":
                result["ip"] = f"10.0.{random.randrange(250)}.{2 + random.randrange(250)}"
            failed += v["state"] == "failed"
            data.append(result)
        req.emit("vm_response", {"task_id": task_id, "data": data, "failed": failed,
                                 "cancelled": cancelled, "worker": req.worker_id})

    @svc.on("cancel_vm")
    def cancel_vm(req):
        arg = req.args[0] if req.args and isinstance(req.args[0], dict) else {}
        task_id = arg.get("task_id") if isinstance(arg.get("task_id"), str) else ""
        found = False
        with lock:
            task = tasks.get(task_id)
            if task is not None and task.owner == req.sid:
                task.cancelled.set()
                found = True
        req.reply({"task_id": task_id, "cancelled": found})

    def cancel_tasks_of(owned):
        with lock:
            for task in tasks.values():
                if owned(task.owner):
                    task.cancelled.set()

    # A socket that is gone reads no progress: its tasks (on this worker)
    # end, and give their capacity back.
    svc.on_disconnect(lambda req: cancel_tasks_of(lambda sid: sid == req.sid))
    # So are the tasks of every socket of a gateway the broker lost: no
    # DISCONNECT comes for those.
    svc.on_gateway_gone(lambda gone: cancel_tasks_of(gone.owns))

    # And of a socket whose DISCONNECT died with the broker that held it (or
    # expired there while that broker had dropped this worker): after a
    # Welcome from a broker that did not know this worker (a new one, or one
    # that had dropped it), each socket with a task is checked.
    @svc.on_welcome
    def check_owners(welcome):
        with lock:
            owners = {task.owner for task in tasks.values() if not task.cancelled.is_set()}
        for sid in owners:
            def settled(state, sid=sid):
                if state in (SocketState.GONE, SocketState.NO_GATEWAY):
                    cancel_tasks_of(lambda owner: owner == sid)
            welcome.check_socket("", sid, settled)

    return svc


def main(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="The Sidecast vm service, in Python")
    p.add_argument("--broker", default=env("SIDECAST_BROKER", "tcp://127.0.0.1:7700"),
                   help="broker ROUTER endpoint (default %(default)s)")
    p.add_argument("--publish", default=env("SIDECAST_PUBLISH", "tcp://127.0.0.1:7701"),
                   help="broker XSUB endpoint for room events (default %(default)s)")
    p.add_argument("--backup-broker", default=env("SIDECAST_BACKUP_BROKER"),
                   help="the other broker of a primary/backup pair (its ROUTER endpoint)")
    p.add_argument("--backup-publish", default=env("SIDECAST_BACKUP_PUBLISH"),
                   help="the other broker's XSUB endpoint")
    p.add_argument("--id", default=env("SIDECAST_ID"), help="worker id (default w-<host>-<pid>)")
    p.add_argument("--capacity", type=int, default=16, help="open_vm/cancel_vm run at once")
    p.add_argument("--launch-ms", type=int, default=4000, help="time one VM takes to launch, ms")
    p.add_argument("--failure-rate", type=float, default=0.1, help="chance that a VM fails (0-1)")
    p.add_argument("--max-count", type=int, default=20, help="VMs one open_vm may ask for")
    p.add_argument("--heartbeat-interval", type=int, default=1000,
                   help="heartbeat interval until the broker's Welcome, ms")
    p.add_argument("--drain-ms", type=int, default=int(env("SIDECAST_DRAIN_MS", "60000")),
                   help="on SIGTERM or SIGINT: take no new work, give launches under way this long "
                        "to finish, then stop: a launch still running is cancelled there (no vm_response "
                        "reaches its socket), and no other worker runs it again: it was acked, ms")
    # The C++ binaries' names too: one SIDECAST_LOG_LEVEL may serve both.
    levels = {"trace": "DEBUG", "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
              "error": "ERROR", "critical": "CRITICAL", "off": "CRITICAL"}
    p.add_argument("--log-level", default=env("SIDECAST_LOG_LEVEL", "info").lower(), type=str.lower,
                   choices=sorted(levels))
    args = p.parse_args(argv)
    if args.log_level not in levels:  # a default from the environment is not checked by argparse
        p.error(f"--log-level (or SIDECAST_LOG_LEVEL) must be one of {', '.join(sorted(levels))}")
    if not 0 <= args.failure_rate <= 1:
        p.error("--failure-rate must be between 0 and 1")
    if bool(args.backup_broker) != bool(args.backup_publish):
        p.error("--backup-broker and --backup-publish go together")
    if args.log_level == "off":
        logging.disable(logging.CRITICAL)
    logging.basicConfig(level=levels[args.log_level],
                        format="%(asctime)s %(levelname)s [vm-worker] %(message)s")
    worker = Worker(args.broker, args.publish, worker_id=args.id,
                    heartbeat_interval=args.heartbeat_interval / 1000.0,
                    backup_broker=args.backup_broker, backup_publish=args.backup_publish)
    worker.add(vm_service(args.capacity, args.launch_ms / 1000.0, args.failure_rate, args.max_count))
    logging.info("worker %s serving vm via %s", worker.id, args.broker)
    worker.run(drain_timeout=args.drain_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

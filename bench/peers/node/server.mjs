// The reference peer: a single-process Node socket.io server that implements
// the app contract of docs/services.md exactly, nothing more. Benchmarks
// compare Sidecast with it, and tests/e2e is proven against it before it is
// trusted against Sidecast.
//
//   node server.mjs [--port N | --http HOST:PORT] [--ping-interval MS] [--ping-timeout MS]
//
// PORT, PING_INTERVAL and PING_TIMEOUT in the environment work too (flags
// win). The host is 127.0.0.1 unless --http names another. Port 0 picks a
// free one; the first line on stdout is always `listening on http://HOST:PORT`.
import { createServer } from "node:http";
import { parseArgs } from "node:util";
import { Server } from "socket.io";

const usage = "usage: node server.mjs [--port N | --http HOST:PORT] [--ping-interval MS] [--ping-timeout MS]";

function options() {
  const { values } = parseArgs({
    strict: true,
    options: {
      port: { type: "string" },
      http: { type: "string" },
      "ping-interval": { type: "string" },
      "ping-timeout": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(usage);
    process.exit(0);
  }
  let host = "127.0.0.1";
  let port = values.port ?? process.env.PORT ?? "8080";
  if (values.http !== undefined) {
    const at = values.http.lastIndexOf(":");
    if (at < 0) throw new Error(`--http wants HOST:PORT, got ${values.http}`);
    host = values.http.slice(0, at).replace(/^\[(.*)\]$/, "$1") || host;
    port = values.http.slice(at + 1);
  }
  const number = (name, text, max = Number.MAX_SAFE_INTEGER) => {
    const n = Number(text);
    if (!/^\d+$/.test(String(text).trim()) || n > max) throw new Error(`${name} wants an integer from 0 to ${max}, got ${text}`);
    return n;
  };
  return {
    host,
    port: number("port", port, 65535),
    pingInterval: number("ping interval", values["ping-interval"] ?? process.env.PING_INTERVAL ?? "25000"),
    pingTimeout: number("ping timeout", values["ping-timeout"] ?? process.env.PING_TIMEOUT ?? "20000"),
  };
}

// The client's ack, if it asked for one, is the last argument: a function,
// which nothing on the wire can decode to.
function takeAck(args) {
  return typeof args.at(-1) === "function" ? args.pop() : undefined;
}

// The demo handlers, the same for every namespace that serves them. Rooms
// belong to the namespace's adapter, so `/` and `/custom` never share one.
function serveDemo(nsp) {
  nsp.on("connection", (socket) => {
    socket.on("echo", (...args) => takeAck(args)?.(...args));
    socket.on("echo-bin", (...args) => takeAck(args)?.(...args));

    socket.on("whoami", (...args) => {
      takeAck(args)?.({ sid: socket.id, nsp: nsp.name, auth: socket.handshake.auth ?? {} });
    });

    socket.on("join", (...args) => {
      const ack = takeAck(args);
      const [room] = args;
      if (typeof room !== "string") return;
      socket.join(room);
      ack?.(room);
    });

    socket.on("leave", (...args) => {
      const ack = takeAck(args);
      const [room] = args;
      if (typeof room !== "string") return;
      socket.leave(room);
      ack?.(room);
    });

    socket.on("say", (...args) => {
      const ack = takeAck(args);
      const [message] = args;
      if (message === null || typeof message !== "object" || typeof message.room !== "string") return;
      nsp.to(message.room).emit("said", { room: message.room, text: message.text, from: socket.id });
      ack?.(true);
    });

    socket.on("call-me-back", (...args) => {
      const ack = takeAck(args);
      socket.emit("callback", ...args, (...reply) => ack?.(...reply));
    });

    // disconnect(false): this namespace only; the Engine.IO connection and
    // the client's other namespaces stay.
    socket.on("bye", () => socket.disconnect(false));
  });
}

let config;
try {
  config = options();
} catch (err) {
  console.error(`server: ${err.message}\n${usage}`);
  process.exit(2);
}
const http = createServer();
const io = new Server(http, {
  serveClient: false,
  pingInterval: config.pingInterval,
  pingTimeout: config.pingTimeout,
});

serveDemo(io.of("/"));
serveDemo(io.of("/custom"));
io.of("/forbidden").use((_socket, next) => next(new Error("forbidden")));
// Any other namespace has no route: socket.io itself answers
// CONNECT_ERROR {"message":"Invalid namespace"}.

http.on("error", (err) => {
  console.error(`server: ${err.message}`);
  process.exit(1);
});
http.listen(config.port, config.host, () => {
  const { address, port } = http.address();
  const shown = address.includes(":") ? `[${address}]` : address;
  console.log(`listening on http://${shown}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    io.close();
    http.closeAllConnections?.();
    process.exit(0);
  });
}

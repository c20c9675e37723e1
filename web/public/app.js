// The demo page: the real socket.io client against the gateway's demo
// namespace ("/"). ?transport=polling or ?transport=websocket pins a transport.
(() => {
  const $ = (id) => document.getElementById(id);
  const wanted = new URLSearchParams(location.search).get("transport");
  const transports = wanted === "polling" || wanted === "websocket" ? [wanted] : ["polling", "websocket"];
  const socket = io({ transports });
  let room = null;

  const line = (text, from, system) => {
    const li = document.createElement("li");
    if (system) li.className = "system";
    if (from) {
      const who = document.createElement("span");
      who.className = "from";
      who.textContent = from === socket.id ? "you" : from.slice(-6);
      li.append(who);
    }
    li.append(document.createTextNode(text));
    $("messages").append(li);
    $("messages").scrollTop = $("messages").scrollHeight;
  };

  const showTransport = () => { $("transport").textContent = socket.io.engine ? socket.io.engine.transport.name : "–"; };

  socket.on("connect", () => {
    $("status").textContent = "connected";
    $("status").className = "status up";
    $("sid").textContent = socket.id;
    $("eio-sid").textContent = socket.io.engine.id;
    showTransport();
    socket.io.engine.on("upgrade", showTransport);
    if (room) socket.emit("join", room);  // rooms are per connection: join again after a reconnect
  });
  socket.on("disconnect", (reason) => {
    $("status").textContent = "disconnected: " + reason;
    $("status").className = "status down";
  });
  socket.on("said", (msg) => { if (msg.room === room) line(String(msg.text), msg.from); });

  $("join-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const next = $("room").value.trim();
    if (!next) return;
    if (room) await socket.emitWithAck("leave", room);
    room = await socket.emitWithAck("join", next);
    line("joined " + room, null, true);
    $("text").disabled = $("say").disabled = false;
    $("text").focus();
  });

  $("say-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value;
    if (!text || !room) return;
    socket.emit("say", { room, text });
    $("text").value = "";
  });

  $("echo-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const started = performance.now();
    const reply = await socket.timeout(5000).emitWithAck("echo", $("echo-text").value).catch((err) => "error: " + err.message);
    $("echo-result").textContent = JSON.stringify(reply) + "  (" + (performance.now() - started).toFixed(1) + " ms)";
  });
})();

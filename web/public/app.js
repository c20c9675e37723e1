// The demo page: the stock socket.io client, two namespaces multiplexed on
// one connection. ?transport=polling or ?transport=websocket pins a transport.
(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const wanted = new URLSearchParams(location.search).get("transport");
  const transports = wanted === "polling" || wanted === "websocket" ? [wanted] : ["polling", "websocket"];
  const manager = new io.Manager({ transports });
  const chat = manager.socket("/chat");
  const vm = manager.socket("/vm");

  // ---- connection status ----
  const showTransport = () => { $("transport").textContent = manager.engine ? manager.engine.transport.name : "–"; };
  manager.on("open", () => {
    $("status").textContent = "connected";
    $("status").className = "status up";
    $("eio-sid").textContent = manager.engine.id;
    showTransport();
    manager.engine.on("upgrade", showTransport);
  });
  manager.on("close", (reason) => {
    $("status").textContent = "disconnected: " + reason;
    $("status").className = "status down";
  });

  // ---- chat ----
  let room = null;
  $("nick").value = localStorage.getItem("sidecast-nick") || "guest" + Math.floor(Math.random() * 1000);
  // Message ids shown: a say run again (its chat worker died after storing
  // it) sends its message again, with the same id, and it shows once.
  const shown = new Set();
  const addMessage = (m) => {
    if (shown.has(m.id)) return;
    shown.add(m.id);
    const li = el("li");
    li.dataset.id = m.id;
    li.append(el("span", "time", new Date(m.ts).toLocaleTimeString()), el("span", "from", m.nick), document.createTextNode(m.text));
    // In id order, as the history is: with several chat workers, live
    // messages may arrive out of it.
    const later = [...$("messages").children].find((c) => c.dataset.id && Number(c.dataset.id) > m.id);
    $("messages").insertBefore(li, later || null);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  const system = (text) => { $("messages").append(el("li", "system", text)); };
  const showMembers = (members) => {
    $("members").replaceChildren(...members.map((n) => el("li", null, n)));
  };
  const join = async () => {
    const nick = $("nick").value.trim(), next = $("room").value.trim();
    if (!nick || !next) return;
    localStorage.setItem("sidecast-nick", nick);
    await chat.emitWithAck("nick", nick);
    if (room && room !== next) await chat.emitWithAck("leave", room);
    room = next;
    $("messages").replaceChildren();
    shown.clear();
    const joined = await chat.emitWithAck("join", room);
    showMembers(joined.members);
    $("text").disabled = $("send").disabled = false;
    $("text").focus();
  };
  chat.on("history", (h) => {
    if (h.room !== room) return;
    h.messages.forEach(addMessage);
    system(h.messages.length ? "— earlier messages above —" : "no messages yet in " + h.room);
  });
  chat.on("message", (m) => { if (m.room === room) addMessage(m); });
  chat.on("presence", (p) => { if (p.room === room) showMembers(p.members); });
  chat.on("connect", () => { if (room) join(); });  // rooms belong to a connection: join again
  $("join-form").addEventListener("submit", (e) => { e.preventDefault(); join(); });
  $("say-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("text").value.trim();
    if (!text || !room) return;
    $("text").value = "";
    const r = await chat.timeout(5000).emitWithAck("say", { room, text }).catch((err) => ({ error: err.message }));
    if (r.error) system("not sent: " + (r.message || r.error));
  });

  // ---- VMs ----
  const tasks = new Map();  // task_id -> {bars: Map(vm -> row), box}
  const vmRow = (task, name) => {
    let row = task.rows.get(name);
    if (!row) {
      row = el("div", "vm");
      const bar = el("div", "bar");
      bar.append(el("div"));
      row.append(el("span", "name", name), bar, el("span", "state", "queued"));
      task.rows.set(name, row);
      task.list.append(row);
    }
    return row;
  };
  // Progress can overtake the ack's promise: keep it until the task is known.
  const early = new Map();  // task_id -> [[event, payload]]
  const later = (event, payload) => {
    if (tasks.has(payload.task_id)) return false;
    if (!early.has(payload.task_id)) early.set(payload.task_id, []);
    early.get(payload.task_id).push([event, payload]);
    return true;
  };
  const onProgress = (p) => {
    if (later("vm_progress", p)) return;
    const task = tasks.get(p.task_id);
    const row = vmRow(task, p.vm);
    row.className = "vm " + p.state;
    row.querySelector(".bar > div").style.width = p.percent + "%";
    row.querySelector(".state").textContent = p.state + " " + p.percent + "%";
  };
  const onResponse = (r) => {
    if (later("vm_response", r)) return;
    const task = tasks.get(r.task_id);
    const up = r.data.filter((d) => d.state === "running");
    task.cancel.disabled = true;
    task.result.textContent = (r.cancelled ? "cancelled. " : "done. ") + up.length + " running, " + r.failed + " failed\n" +
      up.map((d) => d.vm + " → " + d.ip).join("\n");
  };
  vm.on("vm_progress", onProgress);
  vm.on("vm_response", onResponse);
  $("vm-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const box = el("div", "task"), head = el("header"), list = el("div"), result = el("div", "result");
    const cancel = el("button", null, "Cancel");
    const title = el("span", null, "launching…");
    head.append(title, cancel);
    box.append(head, list, result);
    $("tasks").prepend(box);
    const count = Number($("vm-count").value), name = $("vm-name").value.trim() || "vm";
    const ack = await vm.timeout(10000).emitWithAck("open_vm", { count, name }).catch((err) => ({ error: err.message }));
    if (ack.error) {
      title.textContent = "launch refused: " + (ack.message || ack.error);
      cancel.disabled = true;
      return;
    }
    title.textContent = "task " + ack.task_id + " · " + count + " × " + name;
    const task = { rows: new Map(), list, result, cancel };
    tasks.set(ack.task_id, task);
    for (const [event, payload] of early.get(ack.task_id) || []) (event === "vm_progress" ? onProgress : onResponse)(payload);
    early.delete(ack.task_id);
    cancel.addEventListener("click", () => { cancel.disabled = true; vm.emit("cancel_vm", { task_id: ack.task_id }); });
  });
})();

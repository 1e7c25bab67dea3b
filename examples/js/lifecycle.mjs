// Drives one VM through its lifecycle on vmherd with the official
// JavaScript NATS client: prepare (on the Noop backend), start, read its
// record, stop, destroy. It prints every event of its commands and exits
// non-zero on any other outcome. docs/other-languages.md explains it.
//
//   NATS_URL=nats://127.0.0.1:4222 NATS_CREDS=alice.creds node lifecycle.mjs [VM]
import { readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { connect, credsAuthenticator } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";

const PREFIX = "vm"; // the installation's --prefix
const EVENTS = "VM_EVENTS"; // the event stream: the only source of truth
const RECORDS = "VM_RECORDS"; // the bucket of records, folded from the events
const ENGINE = "_engine"; // the writer token of the engines' events
const RESULTS = ["prepared", "started", "stopped", "suspended", "resumed", "destroyed", "migrated"];

// What the credentials say: the identity's name (the issuer token its
// commands must carry) and the one inbox prefix it may receive replies on.
function identity(path) {
  const text = readFileSync(path, "utf8");
  const jwt = text.match(/BEGIN NATS USER JWT-+\s+(\S+)/)?.[1];
  if (!jwt) throw new Error(`${path}: no user JWT`);
  const claims = JSON.parse(Buffer.from(jwt.split(".")[1], "base64url"));
  const inbox = (claims.nats?.sub?.allow ?? []).find(
    (s) => s.startsWith("_INBOX") && s.endsWith(".>") && !/[*>]/.test(s.slice(0, -2)),
  );
  return { creds: new TextEncoder().encode(text), name: claims.name, inboxPrefix: inbox?.slice(0, -2) };
}

const vm = process.argv[2] ?? "js-example";
const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const id = process.env.NATS_CREDS ? identity(process.env.NATS_CREDS) : {};
let nc, js, jsm, records;
try {
  nc = await connect({
    servers: url.split(","),
    name: "vmherd-js-example",
    ...(id.creds && { authenticator: credsAuthenticator(id.creds) }),
    ...(id.inboxPrefix && { inboxPrefix: id.inboxPrefix }),
  });
  js = jetstream(nc);
  jsm = await jetstreamManager(nc);
  records = await new Kvm(js).open(RECORDS);
} catch (err) {
  console.error(`lifecycle: connecting to ${url}: ${err.message} (NATS_URL, NATS_CREDS)`);
  process.exit(1);
}

// An event as stored: its writer is the last token of its subject
// (vm.evt.<vm>.<type>.<writer>), which NATS permissions authenticate. A
// copy the server stored on a client's behalf (a direct get answered on an
// event subject) carries a second Nats-Sequence header: it is no event.
function decode(m) {
  const [pfx, evt, name, type, writer, ...rest] = m.subject.split(".");
  if (pfx !== PREFIX || evt !== "evt" || rest.length || m.header.values("Nats-Sequence").length > 1) return null;
  try {
    const ev = m.json();
    return ev.vm === name && ev.type === type ? { ...ev, writer } : null;
  } catch {
    return null; // readers must ignore events they cannot decode
  }
}

// Publishes a command and waits for the event that ends it.
async function send(action, body = {}) {
  const commandID = "js-" + randomBytes(8).toString("hex");
  // Where to read from: after the stream's last event as of now, before
  // the command is stored, so that no event about it can be missed.
  const from = (await jsm.streams.info(EVENTS)).state.last_seq + 1;
  const subject = [PREFIX, "cmd", vm, action, id.name].filter(Boolean).join(".");
  const ack = await js.publish(subject, JSON.stringify({ command_id: commandID, ...body }), {
    msgID: `${vm}/${commandID}`, // unique across every VM: <vm>/<command id>
  });
  if (ack.duplicate) throw new Error(`${action} ${vm}: dropped as a duplicate`);
  return wait(action, commandID, from);
}

// Reads the VM's events from sequence `from` by direct gets, which leave
// nothing on the server, until the command's result or rejection.
async function wait(action, commandID, from, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  let accepted = null;
  let pause = 5;
  while (Date.now() < deadline) {
    const m = await jsm.direct.getMessage(EVENTS, { seq: from, next_by_subj: `${PREFIX}.evt.${vm}.>` });
    if (!m) {
      await sleep(pause);
      pause = Math.min(2 * pause, 250);
      continue;
    }
    pause = 5;
    from = m.seq + 1;
    const ev = decode(m);
    if (!ev || ev.command_id !== commandID) continue;
    // Decisions count only from an engine; results only from an engine or
    // the worker of the host the command was accepted on.
    const trusted = ev.writer === ENGINE || (accepted && ev.writer === accepted.host);
    console.log(`event ${m.seq} ${ev.type} ${ev.action ?? ""} state=${ev.state ?? ""} host=${ev.host ?? ""} writer=${ev.writer}${trusted ? "" : " (ignored)"}`);
    if (!trusted) continue;
    if (ev.type === "rejected") throw new Error(`${action} ${vm} rejected: ${ev.reason}`);
    if (ev.type === "failed") throw new Error(`${action} ${vm} failed: ${ev.error}`);
    if (ev.type === "accepted") accepted = ev;
    else if (accepted && RESULTS.includes(ev.type)) return { ...ev, seq: m.seq };
  }
  throw new Error(`${action} ${vm}: no result within ${timeoutMs / 1000}s (command ${commandID})`);
}

// The VM's record once it has folded the event at seq: the bucket follows
// the stream a moment behind.
async function record(seq) {
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(20)) {
    const r = (await records.get(vm))?.json();
    if (r && r.last_seq >= seq) return r;
  }
  throw new Error(`the record of ${vm} did not reach event ${seq}`);
}

async function step(action, body, want, state) {
  const ev = await send(action, body);
  if (ev.type !== want) throw new Error(`${action} ${vm}: got ${ev.type}, want ${want}`);
  const r = await record(ev.seq);
  if (r.state !== state) throw new Error(`${action} ${vm}: the record says ${r.state}, want ${state}`);
  return r;
}

try {
  console.log(`connected to ${nc.getServer()} as ${id.name ?? "(no credentials)"}, inbox prefix ${id.inboxPrefix ?? "_INBOX"}`);
  await step("prepare", { spec: { backend: "noop" } }, "prepared", "prepared");
  const r = await step("start", {}, "started", "running");
  console.log(`record ${JSON.stringify(r)}`);
  await step("stop", { timeout_s: 30 }, "stopped", "stopped");
  await step("destroy", {}, "destroyed", "destroyed");
  console.log(`${vm}: prepared, running, stopped, destroyed`);
} catch (err) {
  console.error(`lifecycle: ${err.message}`);
  process.exitCode = 1;
} finally {
  await nc.close();
}

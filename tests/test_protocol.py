"""The socket protocol against a real daemon: authentication, bad input, many clients, the event stream."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable
from engine import protocol
from tests.daemon_helpers import wait_for
from tests.modelpaths import tiny_spec


class Raw:
    """A bare socket speaking the wire format by hand."""

    def __init__(self, home):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(protocol.socket_path(home)))
        self.buf = b""
        self.token = protocol.token_path(home).read_text().strip()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, op, req_id=1, **args) -> dict:
        self.send(protocol.encode(protocol.request(op, req_id, **args)))
        return self.read()

    def hello(self) -> dict:
        reply = self.request("hello", token=self.token)
        assert reply["ok"], reply
        return reply

    def read(self) -> dict | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def assert_alive(home):
    with EngineClient(home, timeout=30).connect() as client:
        assert client.call("status")["ready"] is True


def test_socket_and_token_are_owner_only(daemon):
    for path in (protocol.socket_path(daemon.home), protocol.token_path(daemon.home)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(daemon.home).st_mode) == 0o700
    assert len(protocol.token_path(daemon.home).read_text().strip()) == 64


def test_without_or_with_wrong_token_refused(daemon):
    raw = Raw(daemon.home)
    reply = raw.request("status")
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert raw.closed_by_peer()

    raw = Raw(daemon.home)
    reply = raw.request("hello", token="0" * 64)
    assert reply["error"]["code"] == "unauthorized" and raw.closed_by_peer()

    raw = Raw(daemon.home)
    raw.send(b"not json at all\n")
    assert raw.read()["error"]["code"] == "unauthorized" and raw.closed_by_peer()

    (daemon.home / "token").write_text("f" * 64 + "\n")  # a client holding a different token
    try:
        with pytest.raises(EngineRefused) as info:
            EngineClient(daemon.home, timeout=10).connect()
        assert info.value.code == "unauthorized"
    finally:
        (daemon.home / "token").write_text(raw.token + "\n")
    assert_alive(daemon.home)


def test_bad_requests_get_errors_and_the_connection_goes_on(daemon):
    raw = Raw(daemon.home)
    hello = raw.hello()
    assert hello["result"]["version"] == protocol.VERSION and hello["result"]["pid"] == daemon.pid
    cases = [
        (b"{garbage\n", "bad_json"),
        (b"\xff\xfe\x00\n", "bad_json"),
        (b"[1, 2, 3]\n", "bad_request"),
        (b'{"v": 99, "id": 1, "op": "status"}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "launch_missiles"}\n', "unknown_op"),
        (b'{"v": 1, "id": 1, "op": 7}\n', "unknown_op"),
        (b'{"v": 1, "id": 1, "op": "pause", "args": {"id": 5}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "pause", "args": {}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "pause", "args": {"id": "e1", "x": 1}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "history", "args": {"id": "e1", "since": true}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "start", "args": {"spec": "name = x"}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "status", "args": []}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "get", "args": {"id": "nope"}}\n', "refused"),
        (b'{"v": 1, "id": 1, "op": "export", "args": {"id": "e1", "path": "relative/dir"}}\n', "refused"),
        (b'{"v": 1, "id": 1, "op": "logs", "args": {"since": ' + str(10**30).encode() + b'}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "logs", "args": {"limit": ' + str(-10**30).encode() + b'}}\n', "bad_request"),
        (b'{"v": 1, "id": 1, "op": "history", "args": {"id": "e1", "since": ' + str(10**30).encode() + b'}}\n',
         "bad_request"),
        (b'{"v": 1, "id": 1, "op": "start", "args": {"spec": {}, "idempotency_key": ""}}\n', "bad_request"),
    ]
    for line, code in cases:
        raw.send(line)
        reply = raw.read()
        assert reply is not None and reply["ok"] is False, line
        assert reply["error"]["code"] == code, (line, reply)
        assert reply["error"]["message"]
    raw.send(b"\n")  # blank lines are ignored
    reply = raw.request("status", req_id=42)
    assert reply["ok"] and reply["id"] == 42 and reply["result"]["pid"] == daemon.pid
    raw.close()
    assert_alive(daemon.home)


def test_oversized_line_is_refused_without_buffering(daemon):
    raw = Raw(daemon.home)
    raw.hello()
    try:
        raw.send(b"{" + b"x" * (protocol.MAX_LINE + 100))  # no newline: the engine must not wait for one
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = raw.read()
    assert reply["error"]["code"] == "too_large"
    assert raw.closed_by_peer()
    assert_alive(daemon.home)


def test_silent_and_half_sent_clients_do_not_block(daemon):
    silent = Raw(daemon.home)  # connects, never speaks
    half = Raw(daemon.home)
    half.hello()
    half.send(b'{"v": 1, "id": 2, "op": "sta')  # disconnects mid-message
    half.close()
    t0 = time.time()
    assert_alive(daemon.home)  # others are served meanwhile
    assert time.time() - t0 < 5
    reply = silent.read()  # the hello deadline (2 s in tests) closes the silent one
    assert reply["error"]["code"] == "unauthorized" and "no hello" in reply["error"]["message"]
    assert silent.closed_by_peer()
    assert_alive(daemon.home)


def test_many_clients_at_once(daemon):
    errors, results = [], []

    def worker(n):
        try:
            with EngineClient(daemon.home, timeout=60).connect() as client:
                for _ in range(5):
                    results.append((client.call("status")["pid"], len(client.call("list"))))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 60 and all(pid == daemon.pid for pid, _ in results)


def test_submit_refusals_over_the_socket(daemon, tmp_path):
    bad_reward = tmp_path / "reward.py"
    bad_reward.write_text("def score(p, c, a):\n    return 1.0\n")
    cases = [
        ({"steps": 3}, "name: required"),
        (tiny_spec("r", lora={"rank": 64}), "max_lora_rank 16"),
        (tiny_spec("t", task="juggling"), "unknown task 'juggling'"),
        (tiny_spec("m", reward="no_such_mod_abc:score"), "no_such_mod_abc"),
        (tiny_spec("f", reward=f"{bad_reward}:nope"), "no callable 'nope'"),
        (tiny_spec("k", rollout={"temperature": -1.0}), "rollout.temperature"),
        (tiny_spec("x", lora={"target_modules": ["nonexistent_proj"]}), "nonexistent_proj"),
        (tiny_spec("d", task_args={"digits": 2.5}), "task_args.digits: must be an integer 1..4, got 2.5"),
        (tiny_spec("s", task="sort", task_args={"min_len": 1.5}), "task_args.min_len: must be an integer 1..8"),
        (tiny_spec("u", task_args={"size": 2}), "task_args.size: not an argument of task 'arithmetic' (allowed:"),
        (tiny_spec("v", task_args={"eval_size": 100000}), "task_args.eval_size: must be an integer 1..1024"),
        (tiny_spec("i", reward_timeout_s=float("inf")), "reward_timeout_s: must be a finite number"),
        (tiny_spec("l", optim={"lr": float("inf")}), "optim.lr: must be a finite number"),
        (tiny_spec("w", rollout={"prompts_per_step": 4096, "num_generations": 8}),
         "above this engine's max_step_tokens 262,144; lower rollout.prompts_per_step"),
        (tiny_spec("z", rollout={"max_tokens": 32768}), "max_step_tokens"),
    ]
    with daemon.client() as client:
        for spec, needle in cases:
            with pytest.raises(EngineRefused) as info:
                client.call("start", spec=spec)
            assert info.value.code == "refused" and needle in str(info.value), (spec, str(info.value))
        assert client.call("list") == []
        ok = client.call("start", spec=tiny_spec("good", reward=f"{bad_reward}:score", steps=2))
        assert ok["id"] == "e1"


def test_late_subscriber_gets_snapshot_and_stream(daemon):
    """Client A follows from the start; client B attaches mid-run. B's snapshot + stream hold every
    step exactly once, its sequence numbers are increasing without gaps against A's view."""
    a = daemon.client(timeout=120)
    snap_a = a.subscribe()
    assert snap_a["snapshot"]["tenants"] == [] and snap_a["snapshot"]["status"]["pid"] == daemon.pid
    seq_a = snap_a["seq"]
    with daemon.client() as ctl:
        ctl.call("start", spec=tiny_spec("one", steps=6))
        ctl.call("start", spec=tiny_spec("two", steps=5, task="reverse"))
    events_a: list[dict] = []

    def drain(client, sink, until):
        while not until():
            ev = client.next_event(timeout=1.0)
            if ev is not None:
                sink.append(ev)

    def steps_recorded(tenant):
        return [e for e in events_a if e["kind"] == "step" and e["tenant"] == tenant]

    drain(a, events_a, lambda: len(steps_recorded("e1")) >= 2)
    b = daemon.client(timeout=120)
    snap_b = b.subscribe()
    seq_b = snap_b["seq"]
    assert seq_b >= seq_a
    snapshot_steps = {t["id"]: [h["step"] for h in t["history"]] for t in snap_b["snapshot"]["tenants"]}
    assert len(snapshot_steps["e1"]) >= 2
    assert snap_b["snapshot"]["log"] and all(e["seq"] <= seq_b for e in snap_b["snapshot"]["log"])
    assert {"history", "spec", "evals", "checkpoints", "state"} <= set(snap_b["snapshot"]["tenants"][0])

    def all_done(events):
        return {e["tenant"] for e in events if e["kind"] == "state" and e["data"].get("state") == "done"} >= {"e1", "e2"}

    events_b: list[dict] = []
    threads = [threading.Thread(target=drain, args=(b, events_b, lambda: all_done(events_b))),
               threading.Thread(target=drain, args=(a, events_a, lambda: all_done(events_a)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all_done(events_a) and all_done(events_b)
    a.close()
    b.close()

    seqs_a = [e["seq"] for e in events_a]
    assert seqs_a == list(range(seq_a + 1, seq_a + 1 + len(seqs_a))), "A's stream has a gap or a duplicate"
    seqs_b = [e["seq"] for e in events_b]
    assert seqs_b == sorted(set(seqs_b)) and seqs_b[0] > seq_b
    # B got everything A got after B's snapshot, except steps the snapshot already held.
    expected = [e for e in events_a if e["seq"] > seq_b and e["seq"] <= seqs_b[-1]
                and not (e["kind"] == "step" and e["data"]["step"] in snapshot_steps.get(e["tenant"], []))]
    assert [e["seq"] for e in expected] == seqs_b
    for tenant, total in (("e1", 6), ("e2", 5)):
        streamed = [e["data"]["step"] for e in events_b if e["kind"] == "step" and e["tenant"] == tenant]
        assert snapshot_steps.get(tenant, []) + streamed == list(range(1, total + 1)), tenant
    kinds = {e["kind"] for e in events_a}
    assert {"state", "phase", "step", "log"} <= kinds
    phases = {e["data"]["phase"] for e in events_a if e["kind"] == "phase"}
    assert {"rollout", "train", "sync"} <= phases


def test_subscriber_survives_other_clients_dying(daemon):
    sub = daemon.client(timeout=60)
    sub.subscribe()
    for _ in range(5):
        raw = Raw(daemon.home)
        raw.send(b"\x00" * 1000)
        raw.close()
    with daemon.client() as ctl:
        ctl.call("start", spec=tiny_spec("solo", steps=2))
    ev = wait_for(lambda: sub.next_event(timeout=1.0) or None, what="an event", timeout=60)
    assert ev["seq"] > 0
    sub.close()
    with pytest.raises(EngineUnavailable):
        sub.call("status")


def test_out_of_range_since_on_a_real_tenant(daemon):
    with daemon.client() as client:
        client.call("start", spec=tiny_spec("r", steps=1))
        for op, args in (("history", {"id": "e1", "since": 10**30}), ("logs", {"since": 10**30})):
            with pytest.raises(EngineRefused) as info:
                client.call(op, **args)
            assert info.value.code == "bad_request" and "out of range" in str(info.value)
        assert client.call("history", id="e1", since=0) is not None  # the connection goes on


def test_deep_nesting_gets_an_error_not_a_dropped_connection(daemon):
    raw = Raw(daemon.home)
    raw.hello()
    deep = b'{"v": 1, "id": 5, "op": "status", "args": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n"
    raw.send(deep)
    reply = raw.read()
    assert reply is not None and reply["ok"] is False and reply["error"]["code"] == "bad_json", reply
    nested = b'{"v": 1, "id": 6, "op": "start", "args": {"spec": {"name": "x", "task_args": {"a": ' + \
        b"[" * 40 + b"]" * 40 + b"}}}}\n"
    raw.send(nested)
    reply = raw.read()
    assert reply["error"]["code"] == "bad_request" and "nested deeper" in reply["error"]["message"]
    assert raw.request("status", req_id=7)["ok"]  # same connection, still served
    raw.close()
    assert_alive(daemon.home)


def test_the_hello_deadline_is_one_total_deadline(daemon):
    """A client that trickles a byte every half second is still cut off at the hello deadline (2 s)."""
    raw = Raw(daemon.home)
    t0 = time.time()
    reply = None
    while time.time() - t0 < 10:
        try:
            raw.send(b"{")
        except (BrokenPipeError, ConnectionResetError):
            break
        raw.sock.settimeout(0.5)
        try:
            reply = raw.read()
            break
        except socket.timeout:
            continue
    raw.sock.settimeout(5)
    reply = reply or raw.read()
    elapsed = time.time() - t0
    assert reply is not None and reply["error"]["code"] == "unauthorized" and "no hello" in reply["error"]["message"]
    assert elapsed < 4.0, f"cut off after {elapsed:.1f} s"
    assert raw.closed_by_peer()


def test_unauthenticated_lines_are_bounded(daemon):
    raw = Raw(daemon.home)
    t0 = time.time()
    raw.send(b'{"v": 1, "op": "hello", "args": {"token": "' + b"a" * (protocol.MAX_HELLO_LINE + 10))
    reply = raw.read()
    assert reply["error"]["code"] == "too_large" and str(protocol.MAX_HELLO_LINE) in reply["error"]["message"]
    assert time.time() - t0 < 1.5  # at once, not at the hello deadline
    assert raw.closed_by_peer()
    assert_alive(daemon.home)


def test_connection_cap(daemon):
    held = []
    try:
        for _ in range(64):
            raw = Raw(daemon.home)
            raw.hello()
            held.append(raw)
        with pytest.raises(EngineRefused) as info:
            EngineClient(daemon.home, timeout=10).connect()
        assert info.value.code == "refused" and "too many connections" in str(info.value)
        held.pop().close()
        wait_for(lambda: _connects(daemon.home), timeout=10, what="a free connection slot")
    finally:
        for raw in held:
            raw.close()
    assert_alive(daemon.home)


def _connects(home) -> bool:
    try:
        EngineClient(home, timeout=10).connect().close()
        return True
    except EngineRefused:
        return False


def test_wrong_token_hello_on_an_authenticated_connection(daemon):
    raw = Raw(daemon.home)
    raw.hello()
    reply = raw.request("hello", req_id=2, token="0" * 64)
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert raw.closed_by_peer()
    raw = Raw(daemon.home)
    raw.hello()
    assert raw.request("hello", req_id=3, token=raw.token)["ok"]  # the right token again is fine


def test_start_retried_with_its_idempotency_key_creates_one_experiment(daemon):
    spec = tiny_spec("once", steps=1)
    lost = Raw(daemon.home)
    lost.hello()
    lost.send(protocol.encode(protocol.request("start", 9, spec=spec, idempotency_key="k-1")))
    lost.close()  # the answer is lost: the client retries with the same key
    with daemon.client() as client:
        first = client.call("start", spec=spec, idempotency_key="k-1")
        again = client.call("start", spec=spec, idempotency_key="k-1")
        assert first["id"] == again["id"] == "e1"
        with pytest.raises(EngineRefused) as info:
            client.call("start", spec=tiny_spec("other", steps=1), idempotency_key="k-1")
        assert info.value.code == "bad_request" and "different request" in str(info.value)
        clone = client.call("clone", id="e1", overrides={"name": "c"}, idempotency_key="k-2")
        assert client.call("clone", id="e1", overrides={"name": "c"}, idempotency_key="k-2") == clone
        assert [t["id"] for t in client.call("list")] == ["e1", clone["id"]]
        other = client.call("start", spec=spec)  # no key given: the client makes a fresh one
        assert other["id"] not in ("e1", clone["id"])


def test_app_requests_retried_after_a_timeout_do_not_duplicate(daemon):
    from clora_tui.source import EngineSource

    source = EngineSource(daemon.home, autostart=False)
    try:
        source.requester = EngineClient(daemon.home, timeout=60).connect()
        source.requester.timeout = 1e-6  # the first answer "times out"; the source retries
        result = source.call("start", spec=tiny_spec("retried", steps=1))
        assert result["id"] == "e1"
        with daemon.client() as client:
            time.sleep(0.5)
            assert [t["name"] for t in client.call("list")] == ["retried"]
    finally:
        source.close()

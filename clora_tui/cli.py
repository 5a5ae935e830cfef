"""The `clora-tui` command line: engine control and experiment commands over the socket.

Exit codes: 0 success, 1 refused or failed, 2 usage error, 3 no engine running.
The bare `clora-tui` opens the Textual app (clora_tui.app).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable
from clora_tui.format import nbytes
from engine import protocol
from engine.config import parse_literal as parse_value

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_ENGINE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


# -- output helpers ------------------------------------------------------------------------
def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Compact aligned text table; columns are (key, header)."""
    cells = [[header.upper() for _, header in columns]]
    cells += [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def human_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# -- talking to the engine -----------------------------------------------------------------
def home_of(args) -> Path:
    return Path(args.home).expanduser() if args.home else protocol.clora_home()


def connect(args, timeout: float = 60.0) -> EngineClient:
    try:
        return EngineClient(home_of(args), timeout=timeout).connect()
    except EngineUnavailable as exc:
        raise CliError(f"no engine running on {home_of(args)}: start one with `clora-tui engine start`"
                       f" ({exc})" if "start one" not in str(exc) else str(exc), EXIT_NO_ENGINE) from None
    except EngineRefused as exc:
        raise CliError(f"the engine refused the connection: {exc}") from None


def call(args, op: str, **kwargs) -> Any:
    with connect(args) as client:
        try:
            return client.call(op, **kwargs)
        except EngineRefused as exc:
            raise CliError(str(exc)) from None
        except EngineUnavailable as exc:
            raise CliError(f"lost the engine: {exc}", EXIT_NO_ENGINE) from None


# -- engine start|stop|status --------------------------------------------------------------
def cmd_engine_start(args) -> int:
    from clora_tui.launcher import DaemonError, start_daemon

    if args.max_loras < 1 or args.max_lora_rank < 1:
        raise CliError("--max-loras and --max-lora-rank must be >= 1", EXIT_USAGE)
    if args.max_step_tokens is not None and args.max_step_tokens < 1:
        raise CliError("--max-step-tokens must be >= 1", EXIT_USAGE)
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise CliError("--http-port must be a port number (0 turns the HTTP APIs off)", EXIT_USAGE)
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        status = start_daemon(home_of(args), model=args.model, backend=args.backend, max_loras=args.max_loras,
                              max_lora_rank=args.max_lora_rank, wait_ready=not args.no_wait,
                              timeout=args.timeout, say=say, max_step_tokens=args.max_step_tokens,
                              http_port=args.http_port)
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        emit_json(status)
    else:
        state = "ready" if status.get("ready") else f"warming up ({status.get('stage')})"
        print(f"engine pid {status['pid']} {state} after {status['start_s']:.1f} s, listening on {status['socket']}")
        print(f"model {status['model']}, backend {status['backend']}, device {status['device']}, "
              f"{status['slots_total']} adapter slots, max rank {status['max_lora_rank']}")
    return EXIT_OK


def cmd_engine_stop(args) -> int:
    from clora_tui.launcher import DaemonError, stop_engine

    try:
        stopped = stop_engine(home_of(args), timeout=args.timeout)
    except DaemonError as exc:
        raise CliError(str(exc), EXIT_NO_ENGINE if "no engine" in str(exc) else EXIT_FAIL) from None
    count = stopped.get("checkpointed")
    if isinstance(count, int) and count > 0:
        detail = f"; {count} tenant checkpoint{'s' if count != 1 else ''} written"
    elif count == 0:
        detail = "; no tenant needed a checkpoint"
    else:
        detail = ""
    print(f"engine (pid {stopped['pid']}) stopped{detail}")
    return EXIT_OK


def cmd_engine_status(args) -> int:
    status = call(args, "status")
    if args.json:
        emit_json(status)
        return EXIT_OK
    proc = (status.get("system") or {}).get("process") or {}
    gpus = (status.get("system") or {}).get("gpus") or []
    tenants = ", ".join(f"{n} {s}" for s, n in sorted(status.get("tenants", {}).items())) or "none"
    lines = [
        ("engine", f"pid {status['pid']}, {'ready' if status.get('ready') else status.get('stage')}"),
        ("home", status.get("home")),
        ("model", status.get("model")),
        ("backend", f"{status.get('backend')} on {status.get('device')} ({status.get('dtype')})"),
        ("uptime", human_s(status.get("uptime_s"))),
        ("cold start", human_s(status.get("cold_start_s"))),
        ("tenants", tenants),
        ("adapter slots", f"{status.get('slots_used')} used / {status.get('slots_free')} free "
                          f"(of {status.get('slots_total')}, max rank {status.get('max_lora_rank')})"),
        ("memory", f"RSS {nbytes(proc.get('rss'))} (peak {nbytes(proc.get('peak_rss'))}), "
                   f"CPU {fmt(proc.get('cpu_percent'))} %, {proc.get('processes', '-')} process(es)"),
    ]
    for gpu in gpus:
        if "error" in gpu:
            lines.append((f"gpu {gpu.get('index')}", gpu["error"]))
        else:
            lines.append((f"gpu {gpu['index']}", f"{gpu['name']}: {nbytes(gpu['memory_used'])} / "
                                                f"{nbytes(gpu['memory_total'])}, util {gpu['util']} %"))
    if not gpus:
        lines.append(("gpu", (status.get("system") or {}).get("gpu_error") or "none"))
    if status.get("failed"):
        lines.append(("failed", status["failed"]))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    return EXIT_OK


# -- experiments ---------------------------------------------------------------------------
def cmd_submit(args) -> int:
    from engine.config import SpecError, load_spec

    specs = []
    for name in args.files:  # validate every file before anything is sent
        try:
            # load_spec resolves dataset and reward paths against the file's folder
            specs.append(load_spec(Path(name)).to_dict())
        except SpecError as exc:
            raise CliError(f"invalid experiment spec: {exc}") from None
    results = [call(args, "start", spec=spec) for spec in specs]
    if args.json:
        emit_json(results[0] if len(results) == 1 else results)
    else:
        for result in results:
            print(result["id"])
    return EXIT_OK


LS_COLUMNS = [("id", "id"), ("name", "name"), ("state", "state"), ("progress", "step"), ("task", "task"),
              ("rank", "rank"), ("reward", "reward"), ("accuracy", "acc"), ("eval_accuracy", "eval"),
              ("step_s", "step s"), ("warmup_s", "warm-up s"), ("note", "note")]


def cmd_ls(args) -> int:
    rows = call(args, "list")
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        print("no experiments (submit one with `clora-tui submit FILE.toml`)")
        return EXIT_OK
    for row in rows:
        row["progress"] = progress(row)
        row["note"] = row.get("error") or row.get("reason") or ""
    print(table(rows, LS_COLUMNS))
    return EXIT_OK


STEP_COLUMNS = [("step", "step"), ("reward_mean", "reward"), ("accuracy", "acc"), ("loss", "loss"),
                ("grad_norm", "grad"), (protocol.QUEUE_S, "queue s"), (protocol.ROLLOUT_S, "rollout s"),
                (protocol.TRAIN_S, "train s"), (protocol.SYNC_S, "sync s"), (protocol.CHECKPOINT_S, "ckpt s"),
                (protocol.TOTAL_S, "total s")]


def progress(row: dict) -> str:
    """`12/40`; a Tinker run has no step budget: `12`."""
    return str(row["step"]) if row.get("task") == protocol.TINKER_TASK else f"{row['step']}/{row['steps']}"


def cmd_show(args) -> int:
    info = call(args, "get", id=args.id)
    if args.json:
        emit_json(info)
        return EXIT_OK
    head = [("id", info["id"]), ("name", info["name"]), ("state", info["state"]),
            ("step", progress(info)), ("task", info["task"]), ("rank", info["rank"]),
            ("reward", fmt(info.get("reward"))), ("accuracy", fmt(info.get("accuracy"))),
            ("eval accuracy", fmt(info.get("eval_accuracy"))), ("warm-up", human_s(info.get("warmup_s")))]
    if info.get("reason"):
        head.append(("reason", info["reason"]))
    if info.get("error"):
        head.append(("error", info["error"]))
    width = max(len(k) for k, _ in head)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in head))
    print("\nspec:")
    for key, value in _flatten(info["spec"]):
        print(f"  {key} = {json.dumps(value)}")
    if info["history"]:
        print("\nhistory:")
        print(table(info["history"], STEP_COLUMNS))
    if info.get("evals"):
        print("\nevals: " + ", ".join(f"step {e['step']}: {e['accuracy']:.3f}" for e in info["evals"]))
    if info.get("checkpoints"):
        print("checkpoints: " + ", ".join(f"step {c['step']}" for c in info["checkpoints"]))
    return EXIT_OK


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "task_args":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cmd_command(args) -> int:
    result = call(args, args.command, id=args.id)
    verb = {"pause": "pausing", "resume": "resuming", "kill": "killing"}[args.command]
    if getattr(args, "json", False):
        emit_json(result)
    else:
        print(f"{verb} {result['id']} ({result['name']}, {result['state']} at step {progress(result)})")
    return EXIT_OK


def cmd_clone(args) -> int:
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item!r}: use key=value (e.g. --set optim.lr=1e-3)", EXIT_USAGE)
        overrides[key.strip()] = parse_value(value.strip())
    result = call(args, "clone", id=args.id, overrides=overrides)
    if args.json:
        emit_json(result)
    else:
        print(result["id"])
    return EXIT_OK


def cmd_export(args) -> int:
    result = call(args, "export", id=args.id, path=str(Path(args.dir).expanduser().resolve()))
    print(f"exported {result['id']} at step {result['step']} to {result['path']}")
    return EXIT_OK


def format_log(event: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    data = event.get("data") or {}
    if event["kind"] == "engine":
        return f"{stamp} engine  stage: {data.get('stage')}"
    tenant = event.get("tenant") or "engine"
    level = data.get("level", "info")
    return f"{stamp} {tenant:<6} {'' if level == 'info' else level + ': '}{data.get('message')}"


def cmd_logs(args) -> int:
    if not args.follow:
        for event in call(args, "logs", limit=args.lines):
            print(format_log(event))
        return EXIT_OK
    client = connect(args)
    try:
        snap = client.subscribe()  # the recent log up to seq S, then every event after S
        for event in snap["snapshot"]["log"][-args.lines:]:
            print(format_log(event), flush=True)
        while True:
            ev = client.next_event(timeout=None)
            if ev is not None and ev["kind"] in ("log", "engine"):
                print(format_log(ev), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except EngineUnavailable:
        print("the engine went away", file=sys.stderr)
        return EXIT_NO_ENGINE
    finally:
        client.close()


def cmd_chat(args) -> int:
    from clora_tui.chat import ChatEndpoint, ChatError, chat_loop

    status = call(args, "status")
    if not status.get("openai_base_url"):
        raise CliError(status.get("http_error") or "the engine runs without its HTTP API; restart it with "
                       "`clora-tui engine start --http-port N`")
    endpoint = ChatEndpoint(status["openai_base_url"], status["api_key"], args.id, args.max_tokens, args.temperature)
    try:
        models = endpoint.models()
    except ChatError as exc:
        raise CliError(str(exc)) from None
    card = next((m for m in models if args.id in (m["id"], m.get("name"))), None)
    if card is None and args.id not in ("base", "__base__"):
        live = ", ".join(f"{m['id']} ({m.get('name')})" for m in models)
        raise CliError(f"no live experiment {args.id!r} to chat with; models: {live}")
    if card is not None:
        endpoint.model = card["id"]
    what = f"{endpoint.model} ({card.get('name')}, {card.get('state')})" if card else endpoint.model
    print(f"chatting with {what} through {status['openai_base_url']}; /reset forgets, /quit (or Ctrl-D) ends")
    chat_loop(endpoint, args.system, history=not args.no_history)
    return EXIT_OK


def cmd_bench(args) -> int:
    """The benchmark starts and stops engine daemons of its own (fresh CLORA_HOMEs)."""
    from clora_tui.bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_app(args) -> int:
    try:
        from clora_tui.app import run_app
    except ImportError as exc:
        print(f"the terminal app is not available in this installation ({exc}); "
              "use the subcommands (`clora-tui --help`)", file=sys.stderr)
        return EXIT_FAIL
    app_args = argparse.Namespace(home=args.home, theme=args.theme, replay=None, model=args.app_model,
                                  backend=args.app_backend, max_loras=args.app_max_loras,
                                  max_lora_rank=args.app_max_lora_rank)
    return run_app(app_args) or EXIT_OK


# -- the parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clora-tui",
                                     description="Concurrent multi-LoRA RL experiments: a warm engine and its tenants.")
    parser.add_argument("--home", default=None, help="CLORA_HOME (default: $CLORA_HOME or ~/.clora)")
    app = parser.add_argument_group("the app (bare `clora-tui`; engine options apply if it starts one)")
    app.add_argument("--theme", default=None, help="Textual theme of the app")
    app.add_argument("--model", dest="app_model", default=None, metavar="MODEL", help="model for an engine the app starts")
    app.add_argument("--backend", dest="app_backend", default=None, choices=("auto", "vllm", "peft"))
    app.add_argument("--max-loras", dest="app_max_loras", type=int, default=None, metavar="N")
    app.add_argument("--max-lora-rank", dest="app_max_lora_rank", type=int, default=None, metavar="R")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    eng = sub.add_parser("engine", help="start, stop or inspect the engine daemon")
    esub = eng.add_subparsers(dest="engine_cmd", metavar="ACTION", required=True)
    start = esub.add_parser("start", help="start the engine in the background (survives the terminal)")
    start.add_argument("--model", default="embedded", help="'embedded' (default) or a local Hugging Face model dir")
    start.add_argument("--backend", default="auto", choices=("auto", "vllm", "peft"),
                       help="inference backend (auto: vllm on CUDA, peft on CPU)")
    start.add_argument("--max-loras", type=int, default=8, help="adapter slots: tenants in flight at once")
    start.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank the engine accepts")
    start.add_argument("--max-step-tokens", type=int, default=None, metavar="N",
                       help="refuse experiments whose step samples more than N tokens, prompts x samples x "
                            "(prompt + max_tokens) (default 262144)")
    start.add_argument("--http-port", "--tinker-port", dest="http_port", type=int, default=None, metavar="N",
                       help="port of the HTTP APIs on 127.0.0.1 (Tinker /api/v1 and OpenAI-compatible /v1; "
                            "default 8473, 0: off)")
    start.add_argument("--no-wait", action="store_true", help="return once the socket answers, before warm-up ends")
    start.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the engine")
    start.add_argument("--json", action="store_true")
    start.set_defaults(func=cmd_engine_start)
    stop = esub.add_parser("stop", help="shut the engine down cleanly (tenants checkpointed)")
    stop.add_argument("--timeout", type=float, default=300.0)
    stop.set_defaults(func=cmd_engine_stop)
    st = esub.add_parser("status", help="pid, model, backend, uptime, tenants, slots, memory")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_engine_status)

    p = sub.add_parser("submit", help="start experiments from TOML specs; prints their ids")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ls", help="list experiments")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="one experiment: summary, spec and per-step history")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    for name, text in (("pause", "pause an experiment (keeps its adapter)"), ("resume", "resume a paused experiment"),
                       ("kill", "stop an experiment for good")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_command, command=name)

    p = sub.add_parser("clone", help="start a copy of an experiment, with overrides")
    p.add_argument("id")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("export", help="write an experiment's adapter as a PEFT directory")
    p.add_argument("id")
    p.add_argument("dir")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="talk to an experiment's adapter (or `base`) through the OpenAI endpoint")
    p.add_argument("id", help="experiment id or name, or `base` for the base model")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--max-tokens", type=int, default=None, help="longest reply in tokens (default: the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, the adapter's best answer")
    p.add_argument("--no-history", action="store_true", help="send each message alone (the embedded model "
                                                               "knows single prompts such as 12+7=)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="concurrent vs one-at-a-time throughput on this machine (see --help)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("logs", help="the engine's log")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=200)
    p.set_defaults(func=cmd_logs)
    from clora_tui import cli_metrics

    cli_metrics.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after `bench` belongs to the benchmark
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["CLORA_HOME"] = str(Path(args.home).expanduser())
    if args.cmd is None:
        return cmd_app(args)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `clora-tui ls --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

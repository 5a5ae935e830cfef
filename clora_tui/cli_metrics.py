"""`clora-tui metrics ID` (a tenant's per-step history as CSV or JSON) and `clora-tui
tinker-env` (the two exports that point a Tinker script at this engine)."""

from __future__ import annotations

import csv
import io
import shlex
import sys

from engine import protocol


def cmd_metrics(args) -> int:
    from clora_tui.cli import EXIT_OK, CliError, call, emit_json

    history = call(args, "history", id=args.id, since=0)
    evals = call(args, "get", id=args.id).get("evals", []) if args.evals else []
    if args.json:
        emit_json({"id": args.id, "steps": history, "evals": evals})
        return EXIT_OK
    columns = ["step", "time", *[c for c in _STEP_FIELDS if any(r.get(c) is not None for r in history)]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in columns})
    text = out.getvalue()
    if args.csv and args.csv != "-":
        try:
            with open(args.csv, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
        except OSError as exc:
            raise CliError(f"cannot write {args.csv}: {exc}") from None
        print(f"{len(history)} steps of {args.id} written to {args.csv}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


_STEP_FIELDS = ("reward_mean", "reward_std", "reward_min", "reward_max", "accuracy", "loss", "kl", "grad_norm",
                "entropy", "clip_fraction", "logprob_diff", "completion_tokens", *protocol.TIMING_PARTS,
                protocol.TOTAL_S, protocol.STALENESS)


def cmd_tinker_env(args) -> int:
    from clora_tui.cli import EXIT_OK, CliError, call

    status = call(args, "status")
    if not status.get("tinker_url"):
        raise CliError(status.get("http_error") or "the engine runs without its HTTP API; restart it with "
                       "`clora-tui engine start --tinker-port N`")
    print(f"export TINKER_BASE_URL={shlex.quote(status['tinker_url'])}")
    print(f"export TINKER_API_KEY={shlex.quote(status['api_key'])}")
    return EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser("metrics", help="an experiment's per-step metrics and timing as CSV (or JSON)")
    p.add_argument("id")
    p.add_argument("--csv", metavar="FILE", help="write the CSV to FILE (default: standard output)")
    p.add_argument("--json", action="store_true", help="steps (and --evals) as JSON instead")
    p.add_argument("--evals", action="store_true", help="with --json: the eval accuracies too")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("tinker-env", help="print the exports that point a Tinker SDK script at this engine "
                                          "(eval \"$(clora-tui tinker-env)\")")
    p.set_defaults(func=cmd_tinker_env)

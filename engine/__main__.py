"""`python -m engine serve ...`: run the engine daemon in the foreground.

(`clora-tui engine start` runs this detached, in its own session, logging to
CLORA_HOME/logs/engine.log.)
"""

from __future__ import annotations

import argparse
import sys

from engine import protocol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="the clora multi-LoRA engine")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the engine in the foreground")
    serve.add_argument("--home", default=None, help="CLORA_HOME (default $CLORA_HOME or ~/.clora)")
    serve.add_argument("--model", default="embedded", help="'embedded' or a local Hugging Face model directory")
    serve.add_argument("--backend", default="auto", choices=("auto", "vllm", "peft"))
    serve.add_argument("--max-loras", type=int, default=8, help="adapter slots (tenants in flight at once)")
    serve.add_argument("--max-lora-rank", type=int, default=64)
    serve.add_argument("--max-step-tokens", type=int, default=None,
                       help="largest work of one tenant step, prompts x samples x (prompt + max_tokens) tokens "
                            "(default 262144); bigger specs are refused at submit")
    serve.add_argument("--http-port", type=int, default=None,
                       help="port of the HTTP APIs on 127.0.0.1 (OpenAI-compatible /v1; default 8473, 0: off)")
    train = serve.add_mutually_exclusive_group()
    train.add_argument("--fused-train", dest="fused_train", action="store_const", const=True, default=None,
                       help="all tenants' updates in one mixed-adapter forward/backward (default on CUDA)")
    train.add_argument("--serial-train", dest="fused_train", action="store_const", const=False,
                       help="train tenants one at a time (default on CPU)")
    args = parser.parse_args(argv)

    from engine.daemon import DaemonError, config_from_args, serve as run_serve

    home = args.home or protocol.clora_home()
    try:
        return run_serve(home, config_from_args(args))
    except DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

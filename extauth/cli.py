"""The ``extauth`` command: a thin shell over the public API."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from extauth.config import ConfigError, load_config, with_overrides


def _cmd_serve(args: argparse.Namespace) -> int:
    from extauth.eventloop import run
    from extauth.logs import configure_logging
    from extauth.server import serve

    overrides = {k: v for k, v in (("listen", args.listen), ("admin_listen", args.admin_listen)) if v}
    cfg = with_overrides(load_config(args.config), overrides)
    configure_logging(cfg.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(cfg, config_path=args.config, overrides=overrides), cfg.event_loop)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # Key material is part of the config: load it now so a bad JWKS file or a
    # missing secret fails here, not at the first request.
    from extauth.runtime import build_runtime

    build_runtime(cfg)
    print(f"{args.config}: ok ({len(cfg.policies)} polic{'y' if len(cfg.policies) == 1 else 'ies'})")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from extauth.tokens.mint import mint_token

    claims: dict[str, object] = {"sub": args.sub, "iss": args.iss, "aud": args.aud}
    for extra in args.claim:
        name, sep, value = extra.partition("=")
        if not sep:
            raise SystemExit(f"--claim expects KEY=VALUE, got {extra!r}")
        # ("" is "in" every string: an empty value is the empty string, not JSON.)
        is_json = (value != "" and value[0] in "[{0123456789") or value in ("true", "false")
        try:
            claims[name] = json.loads(value) if is_json else value
        except json.JSONDecodeError:
            claims[name] = value  # "1.2.3", "{not json": a string, as typed
    if args.secret_env:
        import os

        secret = os.environ.get(args.secret_env)
        if not secret:
            raise SystemExit(f"environment variable {args.secret_env} is empty")
        key: str | bytes = secret.encode()
    elif args.key:
        key = Path(args.key).read_bytes()
    else:
        raise SystemExit("give --key PEM_FILE or --secret-env NAME")
    print(mint_token(key=key, alg=args.alg, claims=claims, kid=args.kid, lifetime=args.lifetime))
    return 0


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from extauth.envoy_config import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from extauth.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extauth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ext_authz + access-log gRPC server")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--listen", help="override the config's listen address")
    p.add_argument("--admin-listen", help="override the config's admin_listen address")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file (and its key material)")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("token", help="mint a development token (never for production use)")
    p.add_argument("--key", help="PEM private key file")
    p.add_argument("--secret-env", help="environment variable holding an HMAC secret")
    p.add_argument("--alg", default="RS256")
    p.add_argument("--kid")
    p.add_argument("--sub", required=True)
    p.add_argument("--iss", required=True)
    p.add_argument("--aud", required=True)
    p.add_argument("--lifetime", type=int, default=3600)
    p.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_token)

    from extauth import envoy_config  # light: envoy-data-plane is imported only when run

    p = sub.add_parser("envoy-config", help="print an Envoy bootstrap (YAML) for a config")
    envoy_config.add_arguments(p)
    p.set_defaults(func=_cmd_envoy_config)

    p = sub.add_parser("demo", help="run extauth + Envoy + an echo upstream + two web pages")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (non-interactive runs); default: until Ctrl-C")
    p.add_argument("--port", type=int, default=8080,
                   help="Envoy's public port; the pages use the next two (0: any free ports)")
    p.add_argument("--workdir", help="keep the generated files and Envoy's log here (default: a temp dir)")
    p.add_argument("--tls", action="store_true",
                   help="serve wss:// with a generated self-signed certificate: browsers then open "
                        "the WebSockets over HTTP/2 (RFC 8441); HTTP/3 on the same port")
    p.set_defaults(func=_cmd_demo)

    from extauth.admin.cli import add_admin_parser  # `extauth admin ...`: a thin shell over AdminClient

    add_admin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2

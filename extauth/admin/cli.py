"""``extauth admin ...``: one ``Command`` per subcommand, run through ``AdminClient``.

A new command is one entry in ``COMMANDS``: its words (``"quota set"`` makes a group), its
help, a function adding its arguments and one returning what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from extauth.addresses import split_host_port
from extauth.admin.client import AdminClient, AdminError
from extauth.admin.render import (
    ban_dict,
    lease_dict,
    render_bans,
    render_leases,
    render_overrides,
    render_revocations,
    render_stats,
    revocation_dict,
    time_left,
    when,
)
from extauth.admin.tls import ClientTls
from extauth.config import Config

DEFAULT_ADMIN = str(Config.model_fields["admin_listen"].default)
DEFAULT_TOKEN_ENV = str(Config.model_fields["admin_token_env"].default)


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``2h``, ``1d``, ``1h30m`` or plain seconds (``90``) -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        value = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"bad duration {text!r}: use e.g. 30s, 15m, 2h, 1d")
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        value = sum(float(n) * scale[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"bad duration {text!r}: must be positive")
    return value


# -- the commands ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(client, args, as_json)`` returns the text to print."""

    name: str
    help: str
    run: Callable[[AdminClient, argparse.Namespace, bool], str]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None


def _subject_args(p: argparse.ArgumentParser, user_help: str | None = None,
                  ip_help: str | None = None) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help=user_help)
    who.add_argument("--ip", help=ip_help)


def _connections_args(p: argparse.ArgumentParser) -> None:
    _subject_args(p)
    p.add_argument("--policy", default="", help="one policy (default: every policy)")


def _connections(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    resp = client.connections(user=args.user, ip=args.ip, policy=args.policy)
    out = render_leases(list(resp.leases), as_json=as_json)
    if resp.quota_overrides and not as_json:  # --json stays the list of leases (quota get has them)
        out += "\nquota overrides:\n" + render_overrides(list(resp.quota_overrides), as_json=False)
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _quota_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True)
    p.add_argument("--policy", required=True, help="the policy it applies under")
    p.add_argument("--connections", type=_positive, metavar="N", help="concurrent WebSockets for this user")
    p.add_argument("--attempts-per-minute", type=_positive, metavar="N", help="upgrade attempts per minute")
    p.add_argument("--for", dest="duration", metavar="DURATION", help="how long (default: until cleared)")


def _quota_set(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    if args.connections is None and args.attempts_per_minute is None:
        raise ValueError("give --connections and/or --attempts-per-minute")
    seconds = parse_duration(args.duration) if args.duration else 0.0
    return render_overrides(client.set_quota(args.user, args.policy, connections=args.connections,
                                             attempts_per_minute=args.attempts_per_minute, seconds=seconds),
                            as_json=as_json)


def _quota_who_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True)
    p.add_argument("--policy", default="", help="one policy (default: every policy)")


def _quota_get(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    return render_overrides(client.get_quota(args.user, args.policy), as_json=as_json)


def _quota_clear(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    cleared = client.clear_quota(args.user, args.policy)
    if as_json:
        return json.dumps({"user": args.user, "cleared": cleared})
    return f"cleared the quota override of {args.user}" if cleared else f"{args.user} had no quota override"


def _release_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lease_id", metavar="LEASE")
    _subject_args(p, "the lease's user (as listed by `connections`)",
                  "the lease's client IP (as listed by `connections`)")
    p.add_argument("--policy", default="", help="the lease's policy (default: search every policy)")


def _release(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    resp = client.release(args.lease_id, user=args.user, ip=args.ip, policy=args.policy)
    if as_json:
        return json.dumps({"released": resp.released, "lease": lease_dict(resp.lease)}, indent=2)
    return f"released {resp.lease.lease_id} ({resp.lease.policy}, {resp.lease.ip})"


def _bans(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    return render_bans(client.list_bans(), as_json=as_json)


def _ban_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ip", metavar="IP")
    p.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                   help="how long: 30s, 15m, 2h, 1d")
    p.add_argument("--reason", default="manual")


def _ban(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    ban = client.ban(args.ip, parse_duration(args.duration), args.reason)
    if as_json:
        return json.dumps(ban_dict(ban), indent=2)
    return f"banned {ban.ip} until {when(ban.expires_at)} ({time_left(ban.expires_at, time.time())})"


def _unban_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ip", metavar="IP")


def _unban(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    unbanned = client.unban(args.ip)
    if as_json:
        return json.dumps({"ip": args.ip, "unbanned": unbanned})
    return f"unbanned {args.ip}" if unbanned else f"{args.ip} was not banned"


def parse_instant(text: str) -> float:
    """Unix seconds (``1767225600``) or an ISO 8601 time (``2026-01-01T00:00:00Z``; no zone: UTC)."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    try:
        parsed = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: use unix seconds or e.g. 2026-01-01T12:00:00Z") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _instant_arg(text: str) -> float:
    try:
        return parse_instant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _revocation_target_args(p: argparse.ArgumentParser, *, before: bool) -> None:
    p.add_argument("--sub", required=True, metavar="SUBJECT",
                   help="the user, as the policies' user_claim names it (sub by default); "
                        "needed with --jti and --sid too: revocations live in the user's store slot")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--jti", help="one token, by its jti")
    which.add_argument("--sid", help="one session's tokens, by their sid")
    if before:
        which.add_argument("--before", metavar="TIME", type=_instant_arg,
                           help="every token of --sub issued before TIME (unix seconds or ISO 8601; "
                                "default with --sub alone: now, i.e. log out everywhere)")


def _revocation_target(args: argparse.Namespace) -> tuple[str, str]:
    if args.jti is not None:
        return "jti", args.jti
    if args.sid is not None:
        return "sid", args.sid
    return "before", ""


def _revoke(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    kind, value = _revocation_target(args)
    resp = client.revoke(kind, args.sub, value, args.before or 0.0)
    r = resp.revocation
    if as_json:
        return json.dumps({"recorded": resp.recorded, "revocation": revocation_dict(r)}, indent=2)
    what = {"jti": f"token {r.value} of {r.subject}", "sid": f"session {r.value} of {r.subject}",
            "before": f"every token of {r.subject} issued before {when(r.before)}"}[r.kind]
    if not resp.recorded:
        return f"nothing recorded: no token it covers can still be valid ({what})"
    return f"revoked {what} until {when(r.expires_at)} ({time_left(r.expires_at, time.time())})"


def _unrevoke(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    kind, value = _revocation_target(args)
    found = client.unrevoke(kind, args.sub, value)
    if as_json:
        return json.dumps({"kind": kind, "subject": args.sub, "value": value or None, "unrevoked": found})
    what = f"{kind} {value} of {args.sub}" if value else f"the 'issued before' revocation of {args.sub}"
    return f"unrevoked {what}" if found else f"no revocation of {what.removeprefix('the ')} was in force"


def _revocations(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    return render_revocations(client.list_revocations(), as_json=as_json)


def _stats(client: AdminClient, args: argparse.Namespace, as_json: bool) -> str:
    return render_stats(client.stats(), as_json=as_json)


COMMANDS: tuple[Command, ...] = (
    Command("connections", "live leases of a user or an IP", _connections, _connections_args),
    Command("release", "release one lease (frees its slot)", _release, _release_args),
    Command("bans", "active bans", _bans),
    Command("ban", "ban an IP on every replica", _ban, _ban_args),
    Command("unban", "lift a ban", _unban, _unban_args),
    Command("stats", "active leases, bans and decisions by reason", _stats),
    Command("quota set", "override a user's quota on every replica", _quota_set, _quota_set_args),
    Command("quota get", "a user's quota overrides", _quota_get, _quota_who_args),
    Command("quota clear", "remove a user's quota override", _quota_clear, _quota_who_args),
    Command("revoke", "revoke tokens on every replica: --sub S [--before T] | --sub S --jti J | "
            "--sub S --sid X", _revoke, lambda p: _revocation_target_args(p, before=True)),
    Command("unrevoke", "lift a revocation (--sub S alone: its 'issued before' one)", _unrevoke,
            lambda p: _revocation_target_args(p, before=False)),
    Command("revocations", "revocations in force", _revocations),
)


# -- the parser and the run ------------------------------------------------------------------

def _common_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The connection options, before the subcommand and (``late``) after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin", metavar="ADDR",
        help=f"admin API address (default: admin_listen from -c CONFIG, else {DEFAULT_ADMIN})")
    common.add_argument("-c", "--config", help="read admin_listen and admin_token_env from this config")
    common.add_argument("--token-env", metavar="NAME",
                        help=f"environment variable holding the admin token (default: admin_token_env "
                             f"from -c CONFIG, else {DEFAULT_TOKEN_ENV})")
    common.add_argument("--tls", action="store_true",
                        help="speak TLS (implied by --tls-ca, and by admin_tls in -c CONFIG)")
    common.add_argument("--tls-ca", metavar="PEM", help="CA to trust for the server (default: the system's)")
    common.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    common.add_argument("--tls-key", metavar="PEM", help="client key, for mutual TLS")
    common.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the server's certificate must carry (default: the address's host)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per-call deadline")
    # SUPPRESS keeps an option absent after the subcommand from clobbering one given before it.
    late = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in common._actions:
        kwargs: dict[str, Any] = {"help": argparse.SUPPRESS, "dest": action.dest}
        if action.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = action.metavar
            if action.type is not None:
                kwargs["type"] = action.type
        late.add_argument(*action.option_strings, **kwargs)
    return common, late


def add_admin_parser(sub: Any) -> None:
    """Add the ``admin`` command group to the ``extauth`` subparsers."""
    common, late = _common_options()
    p = sub.add_parser("admin", parents=[common], help="query and manage a running extauth (admin API)")
    top = p.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        *group, word = cmd.name.split()
        parent = top
        if group:
            if group[0] not in groups:
                g = top.add_parser(group[0], help=f"{group[0]} commands")
                groups[group[0]] = g.add_subparsers(dest=f"{group[0]}_command", required=True,
                                                    metavar="COMMAND")
            parent = groups[group[0]]
        c = parent.add_parser(word, parents=[late], help=cmd.help)
        cmd.arguments(c)
        c.set_defaults(admin_run=cmd.run)
    p.set_defaults(func=run_admin)


def _client_settings(args: Any) -> tuple[str, str | None, ClientTls | None]:
    address = args.admin
    token_env = args.token_env
    config_tls = False
    if args.config:
        from extauth.config import load_config

        cfg = load_config(args.config)  # ConfigError: the CLI prints it
        address = address or cfg.admin_listen
        token_env = token_env or cfg.admin_token_env
        config_tls = cfg.admin_tls is not None
    address = address or DEFAULT_ADMIN
    if address.startswith(":"):  # ":PORT" binds every interface, like 0.0.0.0
        address = "0.0.0.0" + address
    host, port = split_host_port(address)
    if host in ("0.0.0.0", "::"):  # a wildcard bind: talk to it over loopback
        address = f"127.0.0.1:{port}" if host != "::" else f"[::1]:{port}"
    token = os.environ.get(token_env or DEFAULT_TOKEN_ENV) or None
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name or config_tls:
        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return address, token, tls


def run_admin(args: Any) -> int:
    """Run one ``extauth admin`` command. Errors print one line on stderr and return 1."""
    try:
        address, token, tls = _client_settings(args)
        with AdminClient(address, token, timeout=args.timeout, tls=tls) as client:
            out = args.admin_run(client, args, bool(args.json))
    except (AdminError, ValueError) as e:
        print(f"extauth admin: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0

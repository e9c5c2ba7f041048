"""Through a real Envoy: a second copy of the token under a name an upstream parser reads as a
token source never reaches the upstream, and no log line records it (docs/security.md)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from tests.e2e.harness import Stack, http_request, token, wait_until

pytestmark = pytest.mark.e2e

# (where the copy goes, how): the "aliases" policy reads query:token, cookie:access_token and
# header:x-auth-token. Each is refused 400 bad_handshake before the upstream sees anything.
REFUSED = [
    ("query", "token[]"), ("query", "token[0]"), ("query", "token[x]"), ("query", "token.x"),
    ("query", "%74oken"), ("query", "x=1;token"),
    ("path", "/{id};token"), ("path", ";token/{id}"), ("path", "/{id};access_token"),
    ("cookie", "access.token"), ("cookie", "access%5Ftoken"), ("cookie", "access_token[]"),
    ("cookie", "Access_Token"), ("cookie", "theme=dark access_token"),
]


def _request(stack: Stack, kind: str, name: str, copy: str) -> tuple[str, int, dict[str, str], bytes]:
    rid = uuid.uuid4().hex[:8]
    good = token(f"user-{rid}")
    base, query, headers = f"/alias/{rid}", f"token={good}", {"host": "svc.example.com"}
    path = base
    if kind == "query":
        query += f"&{name}={copy}"
    elif kind == "path":
        path = "/alias" + name.replace("{id}", rid) + f"={copy}"
    else:
        headers["cookie"] = f"lang=en; {name}={copy}"
    status, resp_headers, body = http_request(stack.port, "GET", f"{path}?{query}", headers)
    return rid, status, resp_headers, body


@pytest.mark.parametrize(("kind", "name"), REFUSED)
def test_an_aliased_copy_is_refused_before_the_upstream(shared_stack: Stack, kind: str, name: str) -> None:
    copy = token("mallory")
    rid, status, headers, _ = _request(shared_stack, kind, name, copy)
    assert (status, headers.get("x-extauth-reason")) == (400, "bad_handshake")
    assert not any(rid in s.path for s in shared_stack.upstream.seen)
    assert not any(copy in s.path or copy in json.dumps(s.headers) for s in shared_stack.upstream.seen)


def test_the_plain_request_passes_and_the_upstream_gets_no_token(shared_stack: Stack) -> None:
    rid = uuid.uuid4().hex[:8]
    good = token(f"user-{rid}")
    status, _, _ = http_request(shared_stack.port, "GET", f"/alias/{rid}?token={good}&page=2",
                                {"cookie": f"lang=en; access_token={good}", "x-auth-token": good})
    assert status == 200
    [seen] = shared_stack.upstream.requests_to(f"/alias/{rid}")
    assert seen.path == f"/alias/{rid}?page=2" and seen.headers["cookie"] == "lang=en"
    assert good not in seen.path + json.dumps(seen.headers)


@pytest.mark.parametrize("name", ["x_auth_token", "x_auth-token", "x-auth_token"])
def test_a_header_spelled_with_underscores_never_reaches_the_upstream(shared_stack: Stack, name: str) -> None:
    # The shipped configs refuse underscored names (headers_with_underscores_action); extauth
    # also strips a header source's spellings on every allow, for an Envoy that lets them in.
    rid = uuid.uuid4().hex[:8]
    copy = token("mallory")
    status, _, _ = http_request(shared_stack.port, "GET", f"/alias/{rid}?token={token(f'user-{rid}')}",
                                {name: copy})
    assert status == 400
    assert shared_stack.upstream.requests_to(f"/alias/{rid}") == []


async def test_no_log_records_a_path_parameter_or_query(shared_stack: Stack) -> None:
    copy = token("mallory")
    rid = uuid.uuid4().hex[:8]
    status, _, _ = http_request(shared_stack.port, "GET", f"/alias/{rid};token={copy}?q={copy}")
    assert status == 400
    envoy = shared_stack.envoy
    assert envoy is not None
    entry = await asyncio.to_thread(
        wait_until,
        lambda: next((e for e in envoy.access_log()
                      if e.get("path") == "(path-parameters-withheld)" and e.get("status") == 400), None),
        5, "the access-log entry")
    assert entry is not None and entry["reason"] == "bad_handshake"
    assert copy not in envoy.text() and copy.split(".")[2] not in envoy.text()
    assert any(d.get("route") == f"/alias/{rid}" and d.get("reason") == "bad_handshake"
               for d in shared_stack.extauth[0].decisions())
    assert copy.split(".")[2] not in shared_stack.extauth[0].text()

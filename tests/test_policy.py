from extauth.config import parse_config
from extauth.policy import select_policy, split_host

CFG = parse_config({
    "policies": [
        {"name": "chat", "match": {"hosts": ["ws.example.com"], "path_prefix": "/ws"}, "origins": []},
        {"name": "api", "match": {"path_prefix": "/api"}, "websocket_only": False},
        {"name": "named-only"},
    ]
})
BY_NAME = {p.name: p for p in CFG.policies}


def pick(context: dict[str, str], host: str, path: str) -> str | None:
    p = select_policy(CFG.policies, BY_NAME, context, host, path)
    return p.name if p else None


def test_context_extension_selects_by_name_first() -> None:
    assert pick({"policy": "named-only"}, "ws.example.com", "/ws") == "named-only"


def test_unknown_name_is_no_policy_not_a_fallthrough() -> None:
    assert pick({"policy": "typo"}, "ws.example.com", "/ws") is None


def test_match_by_host_and_prefix() -> None:
    assert pick({}, "ws.example.com", "/ws/room") == "chat"
    assert pick({}, "WS.Example.com:443", "/ws") == "chat"
    assert pick({}, "other.example.com", "/ws") is None
    assert pick({}, "anything", "/api/v1") == "api"
    assert pick({}, "anything", "/nothing") is None


def test_split_host() -> None:
    assert split_host("Example.com:8080") == "example.com"
    assert split_host("[::1]:80") == "[::1]"
    assert split_host("::1") == "::1"

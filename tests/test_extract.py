import pytest

from extauth.reasons import DenyError, Reason
from extauth.tokens.extract import ExtractDenied, TokenSources

ALL = TokenSources(["query:token", "header:authorization", "cookie:access_token", "subprotocol"])
TOK = "aaa.bbb.ccc"


def test_query_token_and_stripping() -> None:
    e = ALL.extract({}, f"a=1&token={TOK}&b=2")
    assert e.token == TOK and e.source == "query"
    assert e.stripping.query_params_to_remove == ["token"]


def test_header_bearer_case_insensitive_scheme() -> None:
    e = ALL.extract({"authorization": f"bEaReR {TOK}"}, "")
    assert e.token == TOK and e.source == "header"
    assert e.stripping.headers_to_remove == ["authorization"]


def test_authorization_basic_is_not_a_token_but_is_still_stripped() -> None:
    e = ALL.extract({"authorization": "Basic dXNlcjpwYXNz"}, "")
    assert e.token is None
    assert "authorization" in e.stripping.headers_to_remove


def test_cookie_cut_out_other_cookies_kept() -> None:
    e = ALL.extract({"cookie": f"theme=dark; access_token={TOK}; lang=en"}, "")
    assert e.token == TOK and e.source == "cookie"
    assert e.stripping.headers_to_set["cookie"] == "theme=dark; lang=en"


def test_cookie_only_cookie_removed() -> None:
    e = ALL.extract({"cookie": f"access_token={TOK}"}, "")
    assert e.stripping.headers_to_remove == ["cookie"]


def test_subprotocol_token_removed_real_protocols_forwarded() -> None:
    e = ALL.extract({"sec-websocket-protocol": f"chat.v2, bearer.{TOK}, json"}, "")
    assert e.token == TOK and e.source == "subprotocol"
    assert e.stripping.headers_to_set["sec-websocket-protocol"] == "chat.v2, json"
    assert TOK not in str(e.stripping.headers_to_set)


def test_subprotocol_only_token_removes_header() -> None:
    e = ALL.extract({"sec-websocket-protocol": f"bearer.{TOK}"}, "")
    assert e.stripping.headers_to_remove == ["sec-websocket-protocol"]


def test_first_source_wins_and_every_copy_is_stripped() -> None:
    e = ALL.extract({"authorization": "Bearer other.tok.en", "sec-websocket-protocol": f"x, bearer.{TOK}"},
                    f"token={TOK}")
    assert e.token == TOK and e.source == "query"
    assert e.stripping.query_params_to_remove == ["token"]
    assert "authorization" in e.stripping.headers_to_remove
    assert e.stripping.headers_to_set["sec-websocket-protocol"] == "x"


def test_two_different_tokens_in_one_transport_is_malformed() -> None:
    with pytest.raises(DenyError) as err:
        ALL.extract({}, "token=a.b.c&token=d.e.f")
    assert err.value.reason is Reason.TOKEN_MALFORMED


def test_missing() -> None:
    e = ALL.extract({"cookie": "theme=dark"}, "a=1")
    assert e.token is None and e.source is None
    assert e.stripping.headers_to_remove == [] and e.stripping.headers_to_set == {}


def test_unconfigured_transport_ignored() -> None:
    only_header = TokenSources(["header:authorization"])
    assert only_header.extract({}, f"token={TOK}").token is None


# -- query keys Envoy could not strip (it removes by the RAW key) ---------------


@pytest.mark.parametrize("key", ["%74oken", "tok%65n", "%74%6F%6B%65%6E", "Token", "TOKEN", "T%6Fken"])
def test_query_key_alias_is_a_bad_handshake(key: str) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({}, f"a=1&{key}={TOK}")
    assert isinstance(err.value, DenyError)
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert TOK not in err.value.detail
    # The raw key is what Envoy matches: a shadow policy that forwards the request still strips it.
    assert err.value.stripping.query_params_to_remove == [key]


def test_query_key_alias_next_to_the_real_key_is_denied_and_both_stripped() -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({}, f"token={TOK}&%74oken={TOK}")
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert err.value.stripping.query_params_to_remove == ["token", "%74oken"]


def test_query_raw_key_strip_list_holds_the_raw_key() -> None:
    e = ALL.extract({}, f"x%20y=1&token={TOK}&tokens=2")
    assert e.token == TOK
    assert e.stripping.query_params_to_remove == ["token"]


def test_query_encoded_value_still_decoded() -> None:
    e = ALL.extract({}, "token=aaa%2Ebbb.ccc")
    assert e.token == TOK


def test_query_alias_only_matters_for_configured_names() -> None:
    assert TokenSources(["header:authorization"]).extract({}, f"%74oken={TOK}").token is None


# Envoy splits the query on '&' only: ``x=1;token=`` is key ``x`` to it, but ``token`` to an
# upstream that also splits on ';' (Rack 2, older parse_qs).
@pytest.mark.parametrize(("query", "raw_key"), [
    (f"token={TOK}&x=1;token=d.e.f", "x"),
    ("x=1;token=d.e.f", "x"),
    ("a=1&;token=d.e.f", ";token"),
    ("x;Token=d.e.f", "x;Token"),
    ("x=1;%74oken=d.e.f", "x"),
])
def test_query_key_after_a_semicolon_is_a_bad_handshake(query: str, raw_key: str) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({}, query)
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert "d.e.f" not in err.value.detail
    assert raw_key in err.value.stripping.query_params_to_remove


def test_query_semicolons_without_a_token_name_are_allowed() -> None:
    e = ALL.extract({}, f"a=1;b=2&token={TOK}&c=x;tokens=3")
    assert e.token == TOK
    assert e.stripping.query_params_to_remove == ["token"]


def test_empty_query_token_is_stripped_but_does_not_hide_a_later_transport() -> None:
    two = TokenSources(["query:token", "header:authorization"])
    e = two.extract({"authorization": f"Bearer {TOK}"}, "a=1&token=")
    assert e.token == TOK and e.source == "header"
    assert e.stripping.query_params_to_remove == ["token"]
    assert e.stripping.headers_to_remove == ["authorization"]


def test_empty_query_token_alone_is_missing() -> None:
    e = ALL.extract({}, "token=")
    assert e.token is None
    assert e.stripping.query_params_to_remove == ["token"]


# -- cookies an upstream parser reads differently ----------------------------------


@pytest.mark.parametrize(("cookie", "forwarded"), [
    # SimpleCookie also splits on whitespace: the upstream would read the second token.
    (f"access_token={TOK}; theme=dark access_token=d.e.f", None),
    # RFC 2109 parsers split on ','.
    (f"access_token={TOK}; theme=dark, access_token=d.e.f", None),
    (f"lang=en; theme=dark,access_token =d.e.f; access_token={TOK}", "lang=en"),
    # Frameworks that match names case-insensitively.
    (f"Access_Token=d.e.f; access_token={TOK}", None),
    ("ACCESS_TOKEN=d.e.f; lang=en", "lang=en"),
])
def test_cookie_alias_is_a_bad_handshake_and_cut(cookie: str, forwarded: str | None) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({"cookie": cookie}, "")
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert TOK not in err.value.detail and "d.e.f" not in err.value.detail
    s = err.value.stripping
    if forwarded is None:
        assert s.headers_to_remove == ["cookie"] and "cookie" not in s.headers_to_set
    else:
        assert s.headers_to_set == {"cookie": forwarded}


def test_cookie_alias_of_the_second_cookie_source() -> None:
    two = TokenSources(["cookie:access_token", "cookie:session"])
    with pytest.raises(ExtractDenied) as err:
        two.extract({"cookie": f"access_token={TOK}; Session=d.e.f"}, "")
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert "'session'" in err.value.detail


@pytest.mark.parametrize("cookie", [
    f"access_token={TOK}; theme=dark; x=1",
    f"access_token={TOK}; my_access_token=1; access_tokens=2; theme=dark x-access_token=3",
    f"access_token={TOK}; prefs=a,b c=access_token",
])
def test_cookies_near_the_name_are_not_aliases(cookie: str) -> None:
    e = ALL.extract({"cookie": cookie}, "")
    assert e.token == TOK
    assert e.stripping.headers_to_set["cookie"] == cookie.partition("; ")[2]


# -- several cookie sources -------------------------------------------------------


def test_two_cookie_sources_both_cut_in_one_edit() -> None:
    two = TokenSources(["cookie:access_token", "cookie:session"])
    e = two.extract({"cookie": f"access_token={TOK}; theme=dark; session=other.tok.en"}, "")
    assert e.token == TOK and e.source == "cookie"
    assert e.stripping.headers_to_set == {"cookie": "theme=dark"}
    assert e.stripping.headers_to_remove == []


def test_two_cookie_sources_nothing_left_removes_the_header() -> None:
    two = TokenSources(["cookie:access_token", "cookie:session"])
    e = two.extract({"cookie": f"access_token={TOK}; session=other.tok.en"}, "")
    assert e.stripping.headers_to_remove == ["cookie"]
    assert "cookie" not in e.stripping.headers_to_set


def test_second_cookie_source_alone() -> None:
    two = TokenSources(["cookie:access_token", "cookie:session"])
    e = two.extract({"cookie": f"lang=en; session={TOK}"}, "")
    assert e.token == TOK
    assert e.stripping.headers_to_set == {"cookie": "lang=en"}


def test_several_tokens_denial_still_strips_every_copy() -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({"cookie": f"access_token={TOK}; theme=dark", "authorization": f"Bearer {TOK}"},
                    "token=a.b.c&token=d.e.f")
    assert err.value.reason is Reason.TOKEN_MALFORMED
    s = err.value.stripping
    assert s.query_params_to_remove == ["token"]
    assert "authorization" in s.headers_to_remove
    assert s.headers_to_set["cookie"] == "theme=dark"


def test_token_never_in_repr() -> None:
    e = ALL.extract({}, f"token={TOK}")
    assert TOK not in repr(e) and TOK not in str(e)


# -- names common parsers map onto a source name (issue 22) ----------------------------


# PHP, Rails and Node's qs read ``token[]``/``token[0]``/``token[x]`` as ``token``, qs with
# allowDots ``token.x``; PHP reads ``to.ken`` or ``to ken`` as ``to_ken``.
@pytest.mark.parametrize("key", ["token[]", "token[0]", "token[x]", "token%5B%5D", "Token[]", "token.x",
                                 "token%2Ex", "TOKEN.a.b"])
def test_query_key_read_as_the_name_by_an_array_parser_is_a_bad_handshake(key: str) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({}, f"token={TOK}&{key}=d.e.f")
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert "d.e.f" not in err.value.detail
    assert err.value.stripping.query_params_to_remove == ["token", key]


@pytest.mark.parametrize("key", ["access.token", "access+token", "access%20token", "access[token",
                                 "access.token[]", "ACCESS.TOKEN"])
def test_query_key_php_reads_as_the_name_is_a_bad_handshake(key: str) -> None:
    src = TokenSources(["query:access_token"])
    with pytest.raises(ExtractDenied) as err:
        src.extract({}, f"{key}={TOK}")
    assert err.value.reason is Reason.BAD_HANDSHAKE


@pytest.mark.parametrize("query", ["tokens=1", "tokenx=1", "token_type=bearer", "my.token=1", "x[token]=1",
                                   "token2[]=1"])
def test_query_keys_near_the_name_are_not_aliases(query: str) -> None:
    e = ALL.extract({}, f"token={TOK}&{query}")
    assert e.token == TOK
    assert e.stripping.query_params_to_remove == ["token"]


@pytest.mark.parametrize("cookie", ["access.token=d.e.f", "access%5Ftoken=d.e.f", "access_token[]=d.e.f",
                                    "access_token[0]=d.e.f", "access[token=d.e.f", "access%2Etoken=d.e.f",
                                    "access+token=d.e.f", "Access.Token=d.e.f"])
def test_cookie_read_as_the_name_by_php_or_an_array_parser_is_a_bad_handshake(cookie: str) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({"cookie": f"access_token={TOK}; {cookie}; lang=en"}, "")
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert "d.e.f" not in err.value.detail
    # Cut with the real one: a shadow allow forwards neither.
    assert err.value.stripping.headers_to_set == {"cookie": "lang=en"}


@pytest.mark.parametrize("path", ["/ws;token=d.e.f", "/ws;jsessionid=1;token=d.e.f", "/a;Token=d.e.f/ws",
                                  "/ws;%74oken=d.e.f", "/ws;token[]=d.e.f", "/x/ws;access_token=d.e.f",
                                  "/ws;access.token=d.e.f"])
def test_a_path_parameter_named_like_a_query_or_cookie_source_is_a_bad_handshake(path: str) -> None:
    with pytest.raises(ExtractDenied) as err:
        ALL.extract({}, f"token={TOK}", path)
    assert err.value.reason is Reason.BAD_HANDSHAKE
    assert "d.e.f" not in err.value.detail and "path parameter" in err.value.detail


@pytest.mark.parametrize("path", ["/ws", "/ws;jsessionid=1", "/a;v=1/ws;tokens=2", "/ws;authorization=x"])
def test_other_path_parameters_pass(path: str) -> None:
    assert ALL.extract({}, f"token={TOK}", path).token == TOK


def test_path_parameters_only_matter_for_query_and_cookie_sources() -> None:
    src = TokenSources(["header:authorization"])
    assert src.extract({"authorization": f"Bearer {TOK}"}, "", "/ws;token=x").token == TOK


def test_a_header_source_strips_its_underscore_spellings_on_every_request() -> None:
    src = TokenSources(["header:x-auth-token"])
    for headers in ({"x-auth-token": TOK}, {}):
        removed = src.extract(headers, "").stripping.headers_to_remove
        assert {"x_auth_token", "x_auth-token", "x-auth_token"} <= set(removed)
    e = src.extract({"x-auth-token": TOK, "x_auth_token": "d.e.f"}, "")
    assert e.token == TOK and "x_auth_token" in e.stripping.headers_to_remove
    assert "x-auth-token" in TokenSources(["header:x_auth_token"]).extract({}, "").stripping.headers_to_remove
    assert TokenSources(["header:authorization"]).extract({}, "").stripping.headers_to_remove == []

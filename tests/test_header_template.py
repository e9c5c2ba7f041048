from extauth.header_template import Template


def test_template_renders_claims_and_dotted_paths() -> None:
    assert Template("{sub}").render({"sub": "alice"}) == "alice"
    assert Template("tenant-{org.id}").render({"org": {"id": 42}}) == "tenant-42"
    assert Template("{roles}").render({"roles": ["a", "b"]}) == "a,b"
    assert Template("{admin}").render({"admin": True}) == "true"


def test_missing_or_unsafe_claims_render_empty() -> None:
    assert Template("u-{sub}").render({}) == ""
    assert Template("{sub}").render({"sub": {"nested": 1}}) == ""
    assert Template("{sub}").render({"sub": "alice\r\nx-admin: 1"}) == ""
    assert Template("{sub}").render({"sub": "a\x00b"}) == ""
    assert Template("{sub}").render({"sub": "x" * 5000}) == ""

"""Tokens: the token file's format, where tokens come from, the constant-time check (no Ray)."""

from __future__ import annotations

import hashlib

import pytest

from pneumonia.errors import PneumoniaError
from pneumonia.serving import auth

LONG = "k" * 24
OTHER = "o" * 32


def test_named_and_bare_tokens_comments_and_blank_lines():
    tokens = auth.parse_tokens(f"# who may call\n\nward-7:{LONG}\n  {OTHER}  \n", "tokens.txt")
    assert [token.name for token in tokens] == ["ward-7", f"sha256:{hashlib.sha256(OTHER.encode()).hexdigest()[:12]}"]
    assert [token.secret for token in tokens] == [LONG, OTHER]
    assert LONG not in repr(tokens)  # a token never shows in a repr (logs, tracebacks)


def test_a_token_may_hold_a_colon_after_its_name():
    (token,) = auth.parse_tokens(f"pacs:{LONG}:{LONG}", "t")
    assert token.name == "pacs" and token.secret == f"{LONG}:{LONG}"


@pytest.mark.parametrize("text, fragment", [
    ("", "holds no tokens"),
    ("# only a comment\n\n", "holds no tokens"),
    ("short-one-here", "line 1: the token is 14 characters, fewer than 16"),
    (f"a:{LONG}\nb:tooshort", "line 2: the token is 8 characters"),
    (f"bad name:{LONG}", "line 1: a token's name"),
    (f"a:{LONG} and more", "line 1: a token must not contain spaces"),
    (f"a:{LONG}\nb:{LONG}", "line 2: the same token is listed twice"),
    (f"a:{LONG}\na:{OTHER}", "line 2: the name 'a' is used twice"),
])
def test_bad_token_files_are_refused_by_line_without_the_token(text, fragment):
    with pytest.raises(PneumoniaError) as error:
        auth.parse_tokens(text, "tokens.txt")
    assert fragment in str(error.value) and str(error.value).startswith("tokens.txt")
    assert LONG not in str(error.value) and "tooshort" not in str(error.value)


def test_tokens_come_from_the_file_given_then_the_environment(tmp_path):
    given, named = tmp_path / "given.txt", tmp_path / "named.txt"
    given.write_text(f"given:{LONG}\n")
    named.write_text(f"from-env-file:{LONG}\n")
    environ = {auth.TOKEN_FILE_VARIABLE: str(named)}
    assert [t.name for t in auth.resolve_tokens(str(given), environ=environ)] == ["given"]
    assert [t.name for t in auth.resolve_tokens(None, environ=environ)] == ["from-env-file"]
    assert [t.name for t in auth.resolve_tokens(None, environ={auth.TOKENS_VARIABLE: f"secret-env:{OTHER}"})] == ["secret-env"]
    assert auth.resolve_tokens(None, environ={}) == ()
    assert auth.resolve_tokens(None, no_auth=True, environ=environ) == ()  # on purpose, whatever is set
    with pytest.raises(PneumoniaError, match="contradict"):
        auth.resolve_tokens(str(given), no_auth=True, environ={})
    with pytest.raises(PneumoniaError, match="set one"):
        auth.resolve_tokens(None, environ={**environ, auth.TOKENS_VARIABLE: f"x:{OTHER}"})
    with pytest.raises(PneumoniaError, match="token file not found"):
        auth.resolve_tokens(str(tmp_path / "absent.txt"), environ={})


def test_identify_names_the_token_and_says_why_not():
    check = auth.Authenticator(auth.token_digests(auth.parse_tokens(f"a:{LONG}\nb:{OTHER}", "t")))
    assert check.identify(f"Bearer {OTHER}") == ("b", "ok")
    assert check.identify(f"bearer   {LONG} ") == ("a", "ok")
    assert check.identify(None) == (None, "missing")
    assert check.identify(f"Basic {LONG}") == (None, "missing")
    assert check.identify("Bearer ") == (None, "missing")
    assert check.identify(f"Bearer {LONG}x") == (None, "invalid")
    assert check.identify(f"Bearer {LONG[:-1]}") == (None, "invalid")


def test_every_token_is_compared_in_constant_time_with_no_early_exit(monkeypatch):
    """The first token matches, yet every digest is compared, each with hmac.compare_digest."""
    tokens = auth.parse_tokens("\n".join(f"t{index}:{chr(97 + index) * 20}" for index in range(5)), "t")
    check = auth.Authenticator(auth.token_digests(tokens))
    compared = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("a" * 20, "e" * 20, "z" * 20):
        compared.clear()
        check.identify(f"Bearer {presented}")
        assert len(compared) == 5 and all(len(a) == len(b) == 32 for a, b in compared)


def test_replicas_get_digests_not_tokens():
    digests = auth.token_digests(auth.parse_tokens(f"a:{LONG}", "t"))
    assert digests == {"a": hashlib.sha256(LONG.encode()).hexdigest()}


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.1.2.3", False)])
def test_loopback_addresses(host, loopback):
    assert auth.is_loopback(host) is loopback

"""API keys: hashed storage, bearer parsing, key files."""

import pytest

from scalellm.gateway.auth import ANONYMOUS, ApiKeyAuth, hash_key


def test_no_keys_means_anonymous():
    auth = ApiKeyAuth()
    assert not auth.enabled
    assert auth.identify(None) == ANONYMOUS


def test_bearer_key_accepted_and_wrong_rejected():
    auth = ApiKeyAuth(["secret-1", "secret-2"])
    first = auth.identify(b"Bearer secret-1")
    second = auth.identify(b"bearer secret-2")
    assert first and second and first != second
    assert "secret" not in first
    for header in (None, b"", b"Bearer", b"Bearer wrong", b"Basic secret-1", b"secret-1"):
        assert auth.identify(header) is None


def test_keys_stored_only_as_digests():
    auth = ApiKeyAuth(["secret-1"])
    assert auth._digests == [hash_key("secret-1")]
    assert b"secret-1" not in b"".join(auth._digests)


def test_key_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nkey-a\n\n  key-b  \n")
    auth = ApiKeyAuth(["key-c"], key_file=str(path))
    assert all(auth.identify(b"Bearer " + key) for key in (b"key-a", b"key-b", b"key-c"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no keys"):
        ApiKeyAuth(key_file=str(empty))

"""The gateway's HTTP listener over TLS (--ssl-certfile/--ssl-keyfile), and what it refuses."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request

import pytest
from procs import MOCK, Serve, chat_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_the_gateway_serves_https_with_the_given_certificate(certificate):
    cert, key = certificate
    serve = Serve(*MOCK, "--tpot-ms", "1", "--replicas", "1", "--ssl-certfile", cert, "--ssl-keyfile", key)
    try:
        request = urllib.request.Request(f"https://127.0.0.1:{serve.port}/v1/chat/completions",
                                         data=chat_body(3, False), method="POST")
        trusted = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(request, context=trusted, timeout=10) as response:
            assert json.loads(response.read())["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        with pytest.raises(urllib.error.URLError):  # a client that does not trust it
            urllib.request.urlopen(request, context=ssl.create_default_context(), timeout=10)
        with pytest.raises((ConnectionError, urllib.error.URLError)):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{serve.port}/health", timeout=10)
    finally:
        serve.stop()


@pytest.mark.parametrize("flags, message", [
    (["--ssl-certfile", "cert.pem"], "both ssl_certfile and ssl_keyfile"),
    (["--ssl-certfile", "/nonexistent/cert.pem", "--ssl-keyfile", "/nonexistent/key.pem"], "cannot load"),
])
def test_a_bad_tls_setup_is_refused_before_anything_starts(flags, message):
    result = subprocess.run([sys.executable, "-m", "scalellm.cli", "serve", *MOCK, *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr

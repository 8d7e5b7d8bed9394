"""Ask an OpenAI server which model it serves (GET /v1/models), and what it says about it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import orjson


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id listed at ``base_url``/v1/models; RuntimeError if there is none."""
    return str(model_entry(base_url, api_key, timeout_s)["id"])


def model_entry(base_url: str, api_key: str | None = None, timeout_s: float = 10.0, wait_s: float = 0.0) -> dict:
    """The first entry of ``base_url``/v1/models (its ``id`` and whatever else the server reports,
    e.g. ``weight_format``, which the roofline uses); RuntimeError if there is none.

    wait_s: ask again every half second for up to this long while the list is empty (a server whose
    health check answers before it has loaded its model: the bench's compare waits for it)."""
    deadline = time.monotonic() + wait_s
    while (entry := _first_model(base_url, api_key, timeout_s)) is None:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
        time.sleep(0.5)
    return entry


def _first_model(base_url: str, api_key: str | None, timeout_s: float) -> dict | None:
    """The first entry of the listing, None when it lists no model."""
    request = urllib.request.Request(base_url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listing = orjson.loads(response.read())
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as error:
        raise RuntimeError(f"could not list models at {base_url}/v1/models ({error}); "
                           "is the server up? pass --model to skip this") from None
    models = listing.get("data") if isinstance(listing, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        return None
    return models[0]

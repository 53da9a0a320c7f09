"""Fetching from the Hugging Face Hub without hanging on an unresponsive endpoint.

huggingface_hub retries a HEAD that times out five times with back-off (10 s read timeout,
then 1+2+4+8+8 s of sleeps): a Hub that accepts connections but never answers costs ~85 s
per file before any error. A caller who asked for a model that is not in the cache wants to
know in seconds. So, after the cache misses and before any download, one request without
retries asks whether the endpoint answers at all; any HTTP answer (even an error status)
means it is alive and the download proceeds with the library's own handling.

The timeout is huggingface_hub's own `HF_HUB_ETAG_TIMEOUT` (default 10 s): the setting users
of the Hub already know for "how long may a metadata request take"; no new knob.
"""
from __future__ import annotations

from magnet_engine.engine.errors import ModelNotFoundError


def check_reachable(name: str) -> float:
    """Raise ModelNotFoundError within about HF_HUB_ETAG_TIMEOUT seconds when the Hub endpoint
    does not answer (or the Hub is switched off with HF_HUB_OFFLINE); return the timeout used,
    to pass on as `etag_timeout`."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                 "pass a local directory instead")
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout, allow_redirects=False)
    except Exception as exc:  # any transport failure: refused, DNS, TLS, timeout
        raise ModelNotFoundError(f"{name!r} is not in the Hugging Face cache and the Hub at {constants.ENDPOINT} "
                                 f"did not answer within {timeout:g} s ({type(exc).__name__}); pass a local "
                                 "directory instead (HF_HUB_ETAG_TIMEOUT sets the wait)") from None
    return timeout

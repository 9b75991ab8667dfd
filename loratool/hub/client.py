"""Talking to the Hub: `hf://owner/name[@revision]` locations and one error boundary for HTTP.

Endpoint, token and offline mode are read from the environment on every call (`loratool.env`),
and passed to huggingface_hub explicitly, since it freezes HF_ENDPOINT at import.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from .. import env
from ..errors import LoratoolError, UsageError

HF_SCHEME = "hf://"
_LOCATION = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?/?$")
#: What an `hf://` adapter or model needs: weights, configs, tokenizer files; never pickles.
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]


class HubError(LoratoolError):
    """The Hub refused a request, or could not be reached."""


def parse_location(spec: str) -> tuple[str, str | None]:
    """('owner/name', revision or None) for 'hf://owner/name[@revision]'."""
    match = _LOCATION.match(spec)
    if not match:
        raise UsageError(f"{spec!r} is not a Hub location; write hf://owner/name or hf://owner/name@revision")
    return match["repo"], match["revision"]


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


@contextlib.contextmanager
def hub_call(what: str, repo_id: str, token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network failures into one readable HubError (token never included)."""
    from huggingface_hub import errors as hf_errors

    endpoint = env.hub_endpoint()
    try:
        yield
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise HubError(_scrub(f"{what}: {repo_id} (or that revision) was not found at {endpoint}, or the token "
                              "cannot see it", token)) from e
    except hf_errors.HFValidationError as e:
        raise UsageError(f"{what}: {' '.join(str(e).split())}") from e
    except hf_errors.OfflineModeIsEnabled as e:
        raise HubError(f"{what}: HF_HUB_OFFLINE is set and {repo_id} is not in the local cache") from e
    except hf_errors.LocalEntryNotFoundError as e:
        raise HubError(f"{what}: cannot reach the Hub at {endpoint} and {repo_id} is not in the local cache") from e
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        raise HubError(_scrub(f"{what}: {_explain(status, repo_id)}", token)) from e
    except ValueError as e:
        if "Invalid metadata in README.md" not in str(e):
            raise
        reason = " ".join(str(e).split())
        raise HubError(_scrub(f"{what}: the Hub rejected the model card's YAML header ({reason})", token)) from e
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise HubError(_scrub(f"{what}: cannot reach the Hub at {endpoint} ({type(e).__name__}: {e})",
                                  token)) from e
        raise


def _explain(status: int | None, repo_id: str) -> str:
    if status == 401:
        return "the Hub refused the token (401 Unauthorized): it is missing, invalid or expired; set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return f"the Hub refused access (403 Forbidden): this token cannot write to {repo_id}; is it someone else's repo or organization?"
    if status == 404:
        return f"{repo_id} was not found (404)"
    if status == 429:
        return "rate limited by the Hub (429 Too Many Requests); wait a while and retry"
    if status is not None and status >= 500:
        return f"the Hub failed with {status}; retry later"
    return f"the Hub answered {status}"


def quiet_progress_unless_terminal() -> None:
    """huggingface_hub's tqdm bars follow loratool's rule: only on a terminal, and not when disabled."""
    import sys

    from huggingface_hub.utils import disable_progress_bars

    if env.progress_disabled() or not sys.stderr.isatty():
        disable_progress_bars()


def download(repo_id: str, revision: str | None, patterns: list[str], local_dir: Path | None = None) -> Path:
    from huggingface_hub import snapshot_download

    quiet_progress_unless_terminal()
    token = env.hub_token()
    with hub_call(f"downloading {repo_id}", repo_id, token):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_dir=local_dir,
                                   endpoint=env.hub_endpoint(), token=token or False,
                                   local_files_only=env.hub_offline())
    return Path(folder)


def resolve_location(spec: str, kind: str = "adapter") -> Path:
    """A local path for `spec`: itself, or for hf://owner/name[@rev] the snapshot in the standard HF
    cache (downloading only the adapter files, or a model's weights, configs and tokenizer)."""
    if not str(spec).startswith(HF_SCHEME):
        return Path(spec)
    repo_id, revision = parse_location(str(spec))
    return download(repo_id, revision, ADAPTER_PATTERNS if kind == "adapter" else MODEL_PATTERNS)

"""A reverse-proxy sidecar for LLM engine servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-sidecar")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]

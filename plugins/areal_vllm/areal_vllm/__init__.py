"""vLLM rollout server plugin for areal (an HTTP client; vLLM runs as its own server)."""

__version__ = "0.1.0"

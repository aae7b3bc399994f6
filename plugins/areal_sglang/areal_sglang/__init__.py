"""SGLang rollout server plugin for areal (an HTTP client; SGLang runs as its own server)."""

__version__ = "0.1.0"

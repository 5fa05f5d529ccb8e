"""meshnet: Istio-compatible sidecar traffic interception."""

__version__ = "0.1.0"

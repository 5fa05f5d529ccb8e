"""`meshnet explain`: walk a hypothetical connection through a plan (`walk`), evaluating the
plan's typed rules (`conditions`)."""

from meshnet.explain.walk import (
    Explanation,
    explain_iptables,
    explain_nft,
    render_json,
    render_text,
)

__all__ = ["Explanation", "explain_iptables", "explain_nft", "render_json", "render_text"]

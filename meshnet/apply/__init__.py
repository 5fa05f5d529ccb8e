"""The only writers: the two engines (`iptables_engine`, `nft_engine`) behind one
`Backend` (`backend`), the tools they drive, ipsets, policy routes, and the sweep."""

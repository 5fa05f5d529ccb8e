"""Options in, rules out, no I/O: Istio's algorithm written once as a typed rule IR (`ir`,
`steps`), lowered to iptables rules (`iptables`, on the `model`) and to Istio's nft transaction
(`nftables`); the cleanup commands of a plan (`cleanup`)."""

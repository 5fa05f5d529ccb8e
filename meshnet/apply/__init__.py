"""The only writers. `backend` chooses between the two engines (`iptables_engine`,
`nft_engine`) and makes the one decision they share; they drive the tools (`iptables_tool`,
`nft_tool`, `ipset`) and the TPROXY policy routes (`routes`); `sweep` removes whatever meshnet
or Istio installed."""

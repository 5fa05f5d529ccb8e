"""Options in: Istio's flags and env variables (`flags`), parsed and checked into
`Options` (`options`), with the host facts they depend on (`facts`)."""

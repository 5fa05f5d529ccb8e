"""The machine: processes, network namespaces and their locks, netlink, host facts,
and the runtime capture check."""

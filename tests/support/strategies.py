"""Hypothesis strategies for istio-iptables' flags and env variables (valid values only)."""

from __future__ import annotations

from hypothesis import strategies as st

ports = st.integers(1, 65535).map(str)
port_lists = st.lists(ports, max_size=4).map(",".join)
v4_cidrs = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
v6_cidrs = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}")
cidr_lists = st.lists(st.one_of(v4_cidrs, v6_cidrs), max_size=3).map(",".join)
nics = st.lists(st.sampled_from(["eth0", "eth1", "net1", "veth+"]), max_size=2, unique=True)
ids = st.lists(st.integers(0, 70000).map(str), min_size=1, max_size=2, unique=True).map(",".join)
bools = st.sampled_from(["true", "false"])
servers = st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), max_size=2)

flag_values = st.fixed_dictionaries(
    {
        "envoy_port": ports,
        "inbound_capture_port": ports,
        "inbound_tunnel_port": ports,
        "proxy_uid": ids,
        "proxy_gid": st.one_of(st.just(""), ids),
        "inbound_interception_mode": st.sampled_from(["", "REDIRECT", "TPROXY", "NONE"]),
        "inbound_ports": st.one_of(st.just("*"), port_lists),
        "local_exclude_ports": port_lists,
        "exclude_interfaces": nics.map(",".join),
        "service_cidr": st.one_of(st.just("*"), cidr_lists),
        "service_exclude_cidr": cidr_lists,
        "outbound_ports": port_lists,
        "outbound_ports_exclude": port_lists,
        "kube_virt_interfaces": nics.map(",".join),
        "tproxy_mark": st.integers(1, 2**32 - 1).map(str),
        "redirect_dns": bools,
        "capture_all_dns": bools,
        "drop_invalid": bools,
        "enable_ipv6": bools,
        "dns_servers": servers.map(",".join),
    }
)
env_values = st.fixed_dictionaries(
    {},
    optional={
        "ISTIO_OUTBOUND_OWNER_GROUPS": st.lists(ids, max_size=3).map(",".join),
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": st.lists(ids, max_size=3).map(",".join),
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": st.sampled_from(["127.0.0.1/32", "127.0.0.1/8"]),
    },
)

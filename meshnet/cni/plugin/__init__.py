"""The per-pod CNI plugin: the protocol (`main`), ADD/CHECK/DEL (`commands`) and
the pod's decision (`pod`)."""

"""Sidecar-mode CNI: the per-pod plugin (`plugin/`), its Kubernetes calls (`kube/`), the node
daemon that installs it (`install/`), the resident node agent that serves the plugin's calls
(`agent`, with its `wire` format and worker `pool`), the repair controller (`repair`) and the
metrics of the resident process (`metrics`)."""

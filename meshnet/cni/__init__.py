"""The sidecar-mode CNI plugin (meshnet-cni) and its installer."""

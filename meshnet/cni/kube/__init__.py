"""Kubernetes from the node: the plugin's one GET (`plugin_client`), the agent's
list/watch calls (`agent_client`) and the plugin's kubeconfig (`kubeconfig`)."""

"""`meshnet cni install`: the node daemon that installs and keeps the CNI plugin.

Istio's counterpart is install-cni (`cni/pkg/install/install.go`).

It copies the plugin executable into the host's CNI bin dirs, writes the plugin's kubeconfig,
inserts the plugin into the node's primary CNI config (chained mode, the default) or writes a
config of its own (standalone), then keeps all of it in place: when another component rewrites
the config, the token rotates or the binary changes, it installs again. `/readyz` answers 200
while the installation is valid. On SIGTERM or SIGINT it removes exactly what it added.

Design choices:
- **Polling, not inotify.** Every `MESHNET_CNI_POLL_INTERVAL` (0.5 s) it compares a snapshot of
  the conf dir listing, the installed binaries and the service-account dir (a few `stat` calls
  and one 1 KB read). Inotify watches on files die when the file is atomically replaced (Istio
  re-creates its fsnotify watcher on every loop for that reason), need ctypes here, and are
  easy to get wrong on bind-mounted host paths; a 0.5 s poll costs well under 1% of a core and
  reacts faster than any runtime reloads its config.
- **No Kubernetes client, no watchdog**: the daemon never talks to the API server (it only
  writes a kubeconfig for the plugin, with PyYAML), and a poll loop needs no library.
- **The user's config is never lost**: a file it changes is kept beside it under a name no
  runtime loads, and put back on SIGTERM when only our entry changed since.
- Readiness is computed per request from the files themselves, so a config that someone
  rewrote answers 503 at once, not only after the next poll.

Options are environment variables (Istio's names, plus `MESHNET_CNI_*` for meshnet's own); see
`settings.ENV_OPTIONS`. Ambient mode is out of scope: `AMBIENT_ENABLED=true` is rejected.

Modules:
- `settings`: the environment variables (`ENV_OPTIONS`), parsed and validated into `Settings`.
- `files`: atomic writes, the plugin executable's install, the plugin's kubeconfig.
- `config`: our entry in the node's CNI config: create, merge, check, remove, restore.
- `installer`: the `Installer` loop (install, watch, reinstall, readiness, cleanup).
- `http`: the `/readyz` and `/metrics` HTTP server.
- `main`: the process: signals, the servers, repair and agent threads, `main()`.
"""

#!/usr/bin/env bash
# Builds meshnet's two container images with Debian's podman, offline from any registry:
#   localhost/meshnet-base:<key>   Debian bookworm minbase (debootstrap + podman import, cached)
#   localhost/meshnet-init:<tag>   Dockerfile.init: the istio-init replacement
#   localhost/meshnet-cni:<tag>    Dockerfile.cni: the CNI node image (installer + plugin)
#
# Usage (root): bash images/build.sh [base|plugin|init|cni|all]...      (default: all)
# Environment:
#   MESHNET_IMAGE_TAG    tag of the two images (default: the version in pyproject.toml)
#   MESHNET_IMAGE_CACHE  where the base rootfs tarball is kept (default /var/cache/meshnet-images)
#   MESHNET_BASE_IMAGE   use this base instead of building one (e.g. a registry's debian:bookworm-slim)
#   MESHNET_CNI_DIST     an existing cni-plugin/build.sh output dir to use instead of building one
#   MESHNET_BUILD_ISOLATION  "oci" (podman build --runtime runc, default) or "chroot"
#   MESHNET_IMAGE_PRUNE  1 (default): remove dangling images older than 2 h after a build
# Needs: podman, runc, debootstrap (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${MESHNET_IMAGE_CACHE:-/var/cache/meshnet-images}
tag=${MESHNET_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
# The cached base is rebuilt once a week (security updates) or when this recipe changes.
base_recipe=1
base_key=bookworm-minbase-r${base_recipe}-$(date -u +%G-w%V)
base_ref=localhost/meshnet-base:${base_key}
plugin_stage=build/image/meshnet-cni # inside the build context (see .dockerignore)

log() { printf '%s images: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_tools() {
  local missing=() tool
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ "${#missing[@]}" -eq 0 ] ||
    die "missing ${missing[*]}: run scripts/setup.sh (apt-get install podman runc debootstrap)"
  [ "$(id -u)" = 0 ] || die "run as root (debootstrap and rootful podman)"
}

timed() { # timed LABEL CMD...: run CMD, log how long it took
  local label=$1 start=$SECONDS
  shift
  "$@"
  log "$label took $((SECONDS - start)) s"
}

# ---------------------------------------------------------------- base image

# The bookworm mirror as this machine's apt knows it: nothing in the repository names a host.
# ($(...) in the formats is apt's template syntax, not the shell's.)
# shellcheck disable=SC2016
apt_mirror() {
  apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Created-By: Packages' |
    awk '$1 == "bookworm" { print $2; exit }'
}

# The rootfs's apt sources: the same bookworm suites this machine uses (main, updates, security).
# shellcheck disable=SC2016
apt_sources() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' |
    awk '$2 ~ /^bookworm(-updates|-security)?$/ && !seen[$0]++ { print "deb " $1 " " $2 " main" }'
}

# Slim the rootfs as Debian's -slim images do: no docs, man pages or locales, now or later.
slim_rootfs() {
  local root=$1
  cat >"$root/etc/dpkg/dpkg.cfg.d/meshnet-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,info,lintian}/* "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  # Host-specific files: podman provides its own at run time.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  apt_sources >"$root/etc/apt/sources.list"
}

# Unmount anything debootstrap left mounted under $1 (it mounts proc and sys while it runs).
unmount_under() {
  local mnt
  for mnt in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do umount -l "$mnt" || true; done
}

debootstrap_tarball() {
  local tarball=$1 mirror work
  mirror=$(apt_mirror)
  [ -n "$mirror" ] || die "apt knows no bookworm mirror (apt-get update, or set MESHNET_BASE_IMAGE)"
  work=$(mktemp -d "$cache/rootfs.XXXXXX")
  # shellcheck disable=SC2064 # expand $work now: the trap runs after this function returns
  trap "unmount_under '$work'; rm -rf --one-file-system '$work'" EXIT
  log "debootstrap --variant=minbase bookworm (cold cache)"
  if ! debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/log" 2>&1; then
    tail -n 20 "$work/log" >&2
    die "debootstrap failed"
  fi
  slim_rootfs "$work/root"
  tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  unmount_under "$work"
  rm -rf --one-file-system "$work"
  trap - EXIT
  # Older bases are dead weight: one tarball is enough.
  find "$cache" -maxdepth 1 -name 'base-*.tar' -not -name "${tarball##*/}" -delete
}

build_base() {
  if [ -n "${MESHNET_BASE_IMAGE:-}" ]; then
    base_ref=$MESHNET_BASE_IMAGE
    log "base: $base_ref (given)"
    return
  fi
  if podman image exists "$base_ref"; then
    log "base: $base_ref (cached image)"
    return
  fi
  mkdir -p "$cache"
  local tarball=$cache/base-$base_key.tar
  # One builder at a time: a concurrent run waits, then finds the tarball made.
  exec {lock}>"$cache/lock"
  flock "$lock"
  [ -s "$tarball" ] || timed "debootstrap" debootstrap_tarball "$tarball"
  podman image exists "$base_ref" ||
    podman import --quiet --change 'CMD ["/bin/bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "debootstrap --variant=minbase bookworm" "$tarball" "$base_ref" >/dev/null
  flock -u "$lock"
  log "base: $base_ref (imported from $tarball)"
  # Last week's base: untag it, so that prune() frees it once no cached layer builds on it.
  podman images --format '{{.Repository}}:{{.Tag}}' localhost/meshnet-base |
    grep -vxF "$base_ref" | xargs -r -n1 podman untag >/dev/null || true
}

# ---------------------------------------------------------------- plugin and images

build_plugin() {
  rm -rf "$plugin_stage"
  mkdir -p "$(dirname "$plugin_stage")"
  if [ -n "${MESHNET_CNI_DIST:-}" ]; then
    [ -x "$MESHNET_CNI_DIST/meshnet-cni-standalone/meshnet-cni" ] ||
      die "MESHNET_CNI_DIST=$MESHNET_CNI_DIST holds no meshnet-cni-standalone/meshnet-cni"
    mkdir -p "$plugin_stage"
    cp -a "$MESHNET_CNI_DIST/." "$plugin_stage/"
    return
  fi
  [ -x .venv/bin/python ] || die "no .venv: run scripts/setup.sh first"
  timed "plugin build" bash cni-plugin/build.sh "$plugin_stage" >/dev/null
}

podman_build() { # podman_build DOCKERFILE IMAGE [extra args]
  local file=$1 image=$2
  shift 2
  local isolation=(--runtime runc)
  [ "${MESHNET_BUILD_ISOLATION:-oci}" = chroot ] && isolation=(--isolation chroot)
  # --network host: RUN steps (apt, pip) use the host's network without a CNI bridge, so the
  # build never adds netfilter rules to the host. --pull never: no registry is reachable here.
  # The host's CA bundle, for pip behind a TLS-inspecting proxy (a volume: not in the image).
  local ca=() bundle=/etc/ssl/certs/ca-certificates.crt
  [ -s "$bundle" ] && ca=(--volume "$bundle:/run/meshnet-build/ca.crt:ro"
    --build-arg PIP_CERT=/run/meshnet-build/ca.crt)
  podman build "${isolation[@]}" --network host --pull=never --layers \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "${ca[@]}" \
    --build-arg "BASE_IMAGE=$base_ref" -f "$file" -t "$image" "$@" . >&2
  log "built $image"
}

build_init() { timed "init image" podman_build Dockerfile.init "localhost/meshnet-init:$tag"; }

build_cni() {
  [ -x "$plugin_stage/meshnet-cni-standalone/meshnet-cni" ] || build_plugin
  timed "cni image" podman_build Dockerfile.cni "localhost/meshnet-cni:$tag"
}

# Every build with changed sources leaves the previous images untagged (the plugin layer alone
# is ~26 MB): on a machine that CI reuses they would pile up. Layers still in use by tagged
# images are kept; the age limit spares a concurrent build's fresh intermediate images.
prune() {
  [ "${MESHNET_IMAGE_PRUNE:-1}" = 1 ] || return 0
  podman image prune --force --filter until=2h >/dev/null || log "warning: podman image prune failed"
}

main() {
  local steps=("$@")
  [ "${#steps[@]}" -gt 0 ] || steps=(all)
  need_tools podman debootstrap
  [ "${MESHNET_BUILD_ISOLATION:-oci}" = chroot ] || need_tools runc
  local step
  for step in "${steps[@]}"; do
    case $step in
      base) build_base ;;
      plugin) build_plugin ;;
      init) build_base && build_init ;;
      cni) build_base && build_cni ;;
      all) build_base && build_plugin && build_init && build_cni ;;
      *) die "unknown step $step (base, plugin, init, cni, all)" ;;
    esac
  done
  prune
  printf 'localhost/meshnet-init:%s\nlocalhost/meshnet-cni:%s\n' "$tag" "$tag"
}

main "$@"

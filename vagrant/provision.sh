#!/usr/bin/env bash
# Provision one machine of the remus Vagrant lab (vagrant/Vagrantfile runs it
# in every VM). It also runs, unchanged, on the development machine: the test
# suite calls it with REMUS_ETC pointed at a temporary directory, so a broken
# install step fails CI (tests/integration/test_vagrant.py).
#
#   vagrant/provision.sh ROLE [ADDR]
#     ROLE  primary | backup   bin/setup (apt, CRIU, venv), `remus check`,
#                              the pair's key installed as $REMUS_ETC/key (0600)
#           client             python3 and redis-cli only (no CRIU, no key)
#     ADDR  this machine's address on the lab network: the interface holding
#           it is written to $REMUS_ETC/dev (read-only lookup; no network change)
#
# Environment (defaults are the VM's):
#   REMUS_ETC        where key, dev and role go           (/etc/remus)
#   REMUS_KEY_SRC    the key to install                   (vagrant/remus.key,
#                    made by the Vagrantfile on `vagrant up`)
#   REMUS_SETUP_ARGS extra arguments for bin/setup, e.g. --no-apt
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ETC="${REMUS_ETC:-/etc/remus}"
KEY_SRC="${REMUS_KEY_SRC:-$HERE/remus.key}"
read -r -a SETUP_ARGS <<<"${REMUS_SETUP_ARGS:-}"

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '7,18s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# The interface that holds ADDR (IPv4), or nothing.
iface_of() {
  ip -o -4 addr show | awk -v want="$1" '{ split($4, a, "/"); if (a[1] == want) { print $2; exit } }'
}

# apt-get install only what is missing (the client does not run bin/setup).
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Write $2 to file $1 with mode $3, atomically (a reader never sees half a key).
put() {
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  printf '%s\n' "$2" >"$tmp"
  chmod "$3" "$tmp"
  mv -f "$tmp" "$1"
}

# --- arguments and preflight: fail before anything is installed or written ---
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
ROLE="$1"
ADDR="${2:-}"
case "$ROLE" in
  primary|backup|client) ;;
  -h|--help) usage ;;
  *) log "unknown role: $ROLE"; usage ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root"

DEV=""
if [ -n "$ADDR" ]; then
  DEV="$(iface_of "$ADDR")"
  [ -n "$DEV" ] || die "no interface holds $ADDR (ip -o -4 addr show)"
fi
KEY=""
if [ "$ROLE" != client ]; then
  [ -r "$KEY_SRC" ] || die "no key at $KEY_SRC: 'vagrant up' makes vagrant/remus.key; elsewhere set REMUS_KEY_SRC"
  KEY="$(tr -d '[:space:]' <"$KEY_SRC")"
  [[ "$KEY" =~ ^([0-9a-fA-F]{2}){16,}$ ]] \
    || die "$KEY_SRC: expected at least 16 bytes as hex (as 'remus keygen' writes)"
fi

# --- install ---
if [ "$ROLE" = client ]; then
  # The client only needs redis-cli and python3 for `python3 -m remus.loadgen`
  # (standard library only) from the synced tree.
  apt_ensure python3 redis-tools
else
  log "bin/setup ${SETUP_ARGS[*]}"
  "$ROOT/bin/setup" "${SETUP_ARGS[@]}"
  # Same checks the agents depend on; exits 1 with "blocker:" lines if remus cannot run.
  "$ROOT/bin/remus" check >/dev/null || die "'$ROOT/bin/remus check' found blockers (run it to see them)"
fi

install -d -m 0755 "$ETC"
put "$ETC/role" "$ROLE" 0644
if [ -n "$DEV" ]; then
  put "$ETC/dev" "$DEV" 0644
  log "lab interface: $DEV ($ADDR)"
fi
if [ -n "$KEY" ]; then
  put "$ETC/key" "$KEY" 0600
  # The agents read it with this very function: prove they will accept it.
  "$ROOT/.venv/bin/python" -c 'import sys; from remus.protocol import load_key; load_key(sys.argv[1])' \
    "$ETC/key" || die "remus cannot load $ETC/key"
  log "key installed at $ETC/key"
fi
log "done: $ROLE"

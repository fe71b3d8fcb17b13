# scripts/lib.sh — sourced by the scripts in scripts/ (not run): moves to the repository root,
# puts rustup's cargo on PATH, and defines
#   apt_install WHO PACKAGE...   installs those of the Debian packages not installed yet (apt,
#                                with sudo unless root); WHO names the script in its message
#   pip_install REQUIREMENTS     pip-installs a requirements file quietly
#   metric URL NAME [FILTER...]  one number from a framelink binary's /metrics (Prometheus
#                                text): the sum of every sample of NAME whose labels contain
#                                each FILTER (`camera="cam0"`, no spaces); 0 when there is none. The same
#                                rule as bench/benchlib.py's metric() and the Rust test kit's
#                                Daemon::metric.
# Usage, first thing after `set -euo pipefail`:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

apt_install() {
  local who="$1" p missing=()
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "$who: installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pip_install() {
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check -r "$1"
}

metric() {
  local url="$1" name="$2"
  shift 2
  curl -fsS --max-time 5 "$url" | awk -v name="$name" -v filters="$*" '
    BEGIN { n = split(filters, f, " ") }
    /^#/ { next }
    {
      key = $0; sub(/ [^ ]*$/, "", key); base = key; sub(/\{.*/, "", base)
      if (base != name) next
      for (i = 1; i <= n; i++) if (index(key, f[i]) == 0) next
      sum += $NF
    }
    END { printf "%.15g\n", sum + 0 }'
}

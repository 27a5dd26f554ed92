#!/usr/bin/env bash
# Installs what the Celery + Redis peer needs: Debian's redis-server (the binary only; the
# harness starts its own instance on a free loopback port) and Celery with its Redis transport
# in the project venv. Idempotent: each step is skipped when already satisfied.
#
#   perf/peers/setup.sh            # uses the checkout's .venv, or $VENV
#   VENV=/path/to/venv perf/peers/setup.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/.venv}"
pip="$venv/bin/pip"
python="$venv/bin/python"

# Keep in step with the "peer" optional extra that pyproject.toml declares.
requirements=("celery[redis]>=5.4,<6")

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "redis-server is missing and installing it needs root (apt-get install redis-server)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # Debian starts a system instance on 6379; the harness runs its own, so stop that one
    # where a service manager runs it (containers have none, which is fine).
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
        systemctl stop redis-server || true
        systemctl disable redis-server >/dev/null 2>&1 || true
    fi
fi
echo "redis-server: $(redis-server --version)"

if ! "$python" - <<'PY' >/dev/null 2>&1
import celery, redis, kombu
major, minor = (int(x) for x in celery.__version__.split(".")[:2])
raise SystemExit(0 if (major, minor) >= (5, 4) and major < 6 else 1)
PY
then
    "$pip" install --quiet "${requirements[@]}"
fi
"$python" -c 'import celery, redis; print("celery:", celery.__version__, " redis-py:", redis.__version__)'

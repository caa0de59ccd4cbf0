#!/usr/bin/env bash
# The test command: installs what the checks need, then runs every check.
#
#   bash scripts/test.sh [pytest arguments...]
#
# System packages (Debian, installed only when missing; needs root or sudo):
#   zookeeper   java + /usr/share/java/zookeeper.jar, for the real-ZooKeeper fixture
#   prometheus  promtool + prometheus, for the dashboard and metrics checks (~20 MB, ~10 s)
#   chromium chromium-driver  headless Chromium + chromedriver, for the console's browser
#               tests (tests/e2e/test_console.py, driven by selenium; ~100 MB)
#   mariadb-server  for the MySQL store tests: started when 127.0.0.1:3306 does not answer,
#               and root may then log in over TCP without a password (as on the dev image).
#               KITEQ_TEST_MYSQL=mysql://user:pw@host:port points the tests elsewhere instead.
#   nodejs npm  for the Node.js conformance kit (tests/interop), when node is missing
#               (Debian 12 ships Node 18; the kit needs >= 18)
# Python: the project with its server and bench extras, editable, plus the "dev" dependency group.
# Node: the kit's npm packages from tests/interop/package-lock.json (npm ci).
# Checks: protobuf freshness, dashboard freshness (kiteq.ops.dashboard --check), ruff format, ruff lint, mypy (strict), pytest.
# pytest collecting no test (exit code 5) fails the run. Under CI=true a test whose
# component is missing fails instead of skipping (tests/_servers/__init__.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
started=$SECONDS
summary=()
current=""

report_failure() {
    local rc=$?
    if ((rc != 0)) && [[ -n $current ]]; then
        printf '\n==> FAILED: %s (exit code %s)\n' "$current" "$rc" >&2
        ((${#summary[@]} == 0)) || printf '%s\n' "${summary[@]}" >&2
    fi
}
trap report_failure EXIT

step() {
    current=$1
    shift
    local t0=$SECONDS
    printf '\n==> %s\n' "$current"
    "$@"
    summary+=("$(printf '%-20s ok %5ss' "$current" $((SECONDS - t0)))")
    current=""
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "error: '$*' needs root (or sudo)" >&2
        return 1
    fi
}

system_packages() {
    local missing=()
    if ! command -v java >/dev/null || [[ ! -f /usr/share/java/zookeeper.jar ]]; then
        missing+=(zookeeper)
    fi
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        missing+=(prometheus)
    fi
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        missing+=(chromium chromium-driver)
    fi
    if ((${#missing[@]} == 0)); then
        echo "system packages present"
        return
    fi
    echo "installing ${missing[*]}"
    as_root apt-get update -qq
    # --no-install-recommends: prometheus recommends node-exporter, a daemon we do not need.
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}

mariadb_admin() {
    local admin
    admin=$(command -v mariadb-admin || command -v mysqladmin)
    "$admin" --no-defaults --protocol=tcp -h127.0.0.1 -P3306 --connect-timeout=2 "$@"
}

mariadb_server() {
    if [[ -n ${KITEQ_TEST_MYSQL:-} ]]; then
        echo "KITEQ_TEST_MYSQL is set: the tests use that server"
        return
    fi
    if [[ ! -x /usr/sbin/mariadbd ]]; then
        echo "installing mariadb-server"
        as_root apt-get update -qq
        as_root apt-get install -y -qq mariadb-server </dev/null
    fi
    # ping exits 0 whenever the server answers, even if it refuses the login
    if ! mariadb_admin ping >/dev/null 2>&1; then
        echo "starting mariadbd"
        as_root install -d -o mysql -g mysql /run/mysqld
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd \
            -- --user=mysql
        local tries=0
        until mariadb_admin ping >/dev/null 2>&1; do
            if ((++tries > 120)); then
                echo "error: mariadbd does not answer on 127.0.0.1:3306 after 60s" >&2
                return 1
            fi
            sleep 0.5
        done
    fi
    if ! mariadb_admin -uroot status >/dev/null 2>&1; then
        # a fresh Debian install lets root in through the socket only
        echo "allowing root@127.0.0.1 without a password (test server)"
        as_root mariadb -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
            GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
    fi
    mariadb_admin -uroot version | sed -n '/Server version/p'
}

python_packages() {
    # Dependency groups (pyproject [dependency-groups]) need pip >= 25.1.
    local help
    help=$("$PYTHON" -m pip install --help)
    if [[ $help != *--group* ]]; then
        "$PYTHON" -m pip install -q --root-user-action=ignore --upgrade 'pip>=25.1'
    fi
    "$PYTHON" -m pip install -q --root-user-action=ignore -e ".[server,bench,otel]" --group dev
}

node_packages() {
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "installing nodejs npm"
        as_root apt-get update -qq
        as_root apt-get install -y -qq --no-install-recommends nodejs npm </dev/null
    fi
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    if ((major < 18)); then
        echo "error: node $(node --version) is too old for tests/interop (needs >= 18)" >&2
        return 1
    fi
    echo "node $(node --version), npm $(npm --version)"
    (cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)
}

run_pytest() {
    local rc=0
    "$PYTHON" -m pytest --durations=10 "$@" || rc=$?
    if ((rc == 5)); then
        echo "error: pytest collected no tests (exit code 5); failing the run" >&2
        return 1
    fi
    return "$rc"
}

step "system packages" system_packages
step "mariadb" mariadb_server
step "python packages" python_packages
step "node packages" node_packages
step "protobuf freshness" "$PYTHON" proto/generate.py --check
step "dashboard freshness" "$PYTHON" -m kiteq.ops.dashboard --check
step "ruff format" "$PYTHON" -m ruff format --check .
step "ruff check" "$PYTHON" -m ruff check .
step "mypy" "$PYTHON" -m mypy
step "pytest" run_pytest "$@"

printf '\n==> summary\n'
printf '%s\n' "${summary[@]}"
printf 'all checks passed in %ss\n' $((SECONDS - started))

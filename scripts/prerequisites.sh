# Sourced by scripts/test and scripts/demo: installs, on Debian, what building
# and testing freezeframe needs. Safe to run again; it only adds what is missing.

# What building and running freezeframe needs: scripts/demo installs only these.
FREEZEFRAME_BUILD_PACKAGES=(
    clang llvm make pkg-config libelf-dev zlib1g-dev  # BPF programs, vendored libbpf
    bpftool                                            # vmlinux.h from the running kernel's BTF
    curl ca-certificates                               # rustup, where there is no Rust toolchain
)

# What the test suite adds: scripts/test installs these too.
FREEZEFRAME_TEST_PACKAGES=(
    golang-go                                          # `go tool pprof`, the independent pprof decoder
    util-linux procps                                  # unshare, setpriv, pgrep for the tests
    python3 python3-venv                               # the OpenTelemetry SDK clients of the end-to-end tests
    prometheus                                         # prometheus and promtool: scraping, alert rules, dashboards' PromQL
    openssl                                            # a private CA for the export TLS tests
    openjdk-17-jdk-headless nodejs                     # JIT runtimes whose blocked stacks the BPF tests name
    gcc libc6-dev                                      # the -O2 C fixture of the unwinding test, against the system glibc
)

# The benchmarks' baselines (bench/probe_cost.py): install by hand with
# `apt-get install libbpf-tools` (offcputime).

# A virtualenv with the Python clients (tests/e2e/requirements.txt), in target/.
ensure_python_clients() {
    local venv=target/e2e-venv
    if [ ! -x "$venv/bin/pytest" ] || ! cmp -s tests/e2e/requirements.txt "$venv/requirements.txt"; then
        echo "freezeframe: installing the Python test clients into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
        cp tests/e2e/requirements.txt "$venv/requirements.txt"
    fi
}

ensure_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "freezeframe: this needs root (it installs packages and loads BPF programs): run it as root" >&2
            exit 1
        fi
        echo "freezeframe: this needs root (it installs packages and loads BPF programs); re-running with sudo" >&2
        exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME "$0" "$@"
    fi
}

# Installs the Debian packages of the named groups (build, test) that are
# missing, then a Rust toolchain if there is none.
install_prerequisites() {
    local wanted=() missing=()
    for group in "$@"; do
        case "$group" in
            build) wanted+=("${FREEZEFRAME_BUILD_PACKAGES[@]}") ;;
            test) wanted+=("${FREEZEFRAME_TEST_PACKAGES[@]}") ;;
            *) echo "freezeframe: unknown prerequisite group $group" >&2; return 1 ;;
        esac
    done
    for package in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "freezeframe: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        [ -x "$HOME/.cargo/bin/cargo" ] || {
            echo "freezeframe: installing the Rust toolchain with rustup" >&2
            curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
        }
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
}

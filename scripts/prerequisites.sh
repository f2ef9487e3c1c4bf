# Sourced by scripts/test and scripts/demo: installs, on Debian, what building
# and testing freezeframe needs. Safe to run again; it only adds what is missing.

FREEZEFRAME_DEBIAN_PACKAGES=(
    clang llvm make pkg-config libelf-dev zlib1g-dev  # BPF programs, vendored libbpf
    bpftool                                            # vmlinux.h from the running kernel's BTF
    golang-go                                          # `go tool pprof`, the independent pprof decoder
    libbpf-tools                                       # offcputime, the benchmark's baseline
    util-linux procps                                  # unshare, setpriv, pgrep for the tests
    python3 python3-venv                               # the OpenTelemetry SDK clients of the end-to-end tests
    prometheus                                         # prometheus and promtool: scraping, alert rules, dashboards' PromQL
    curl ca-certificates
    openssl                                            # a private CA for the export TLS tests
)

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

install_prerequisites() {
    local missing=()
    for package in "${FREEZEFRAME_DEBIAN_PACKAGES[@]}"; do
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

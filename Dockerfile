# syntax=docker/dockerfile:1
#
# The freezeframe sidecar image (deploy/kubernetes runs it).
#
#   docker build -t freezeframe:0.1.0 .
#
# The BPF program is compiled against a vmlinux.h that build.rs generates
# from the build machine's BTF (/sys/kernel/btf/vmlinux; BuildKit's build
# containers see the host kernel's). CO-RE makes the result run on any
# BTF-enabled kernel, not just the builder's. Where the builder has no BTF,
# put a vmlinux.h into the build context and pass
#   --build-arg FREEZEFRAME_VMLINUX_H=/src/vmlinux.h

ARG RUST_VERSION=1.88
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
# clang and llvm compile the BPF program, libelf and zlib build the vendored
# libbpf, bpftool writes vmlinux.h.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        clang llvm make pkg-config libelf-dev zlib1g-dev bpftool \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG FREEZEFRAME_VMLINUX_H=
# .cargo/config.toml keeps frame pointers on. The caches keep crates and
# build outputs across builds; the binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -n "$FREEZEFRAME_VMLINUX_H" ]; then export FREEZEFRAME_VMLINUX_H; else unset FREEZEFRAME_VMLINUX_H; fi \
    && cargo build --release --locked \
    && install -D target/release/freezeframe /out/freezeframe

FROM debian:${DEBIAN_RELEASE}-slim
# What the binary links against beyond libc (libbpf is built in), and CA
# certificates for OTLP over TLS.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libelf1 zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/freezeframe /usr/local/bin/freezeframe
# uid 0, because BPF needs capabilities in the initial user namespace and
# Kubernetes grants capabilities to root only; the pod spec drops every
# capability but the few it needs (deploy/kubernetes/deployment.yaml).
USER 0
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/freezeframe"]
CMD ["run", "--config", "/etc/freezeframe/freezeframe.toml"]

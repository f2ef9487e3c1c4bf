//! Builds the BPF programs in `bpf/` and generates their Rust skeletons.
//!
//! `vmlinux.h` is generated at build time from the build machine's BTF
//! (`bpftool btf dump file /sys/kernel/btf/vmlinux format c`) rather than
//! committed. Thanks to CO-RE the header only has to name the types and fields
//! we use, not match the kernel we later run on, so any BTF-enabled build host
//! will do, and the repository does not carry ~3 MB of generated C. Where the
//! build host has no BTF (some container builders), point
//! `FREEZEFRAME_VMLINUX_H` at a header generated elsewhere.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

const PROGRAMS: &[&str] = &["offcpu"];
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    provide_vmlinux_h(&out_dir);

    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("freezeframe's BPF programs do not support target arch {other}"),
        Err(_) => panic!("cargo did not set CARGO_CFG_TARGET_ARCH"),
    };

    let mut clang_args = vec![
        format!("-I{}", out_dir.display()),
        "-Ibpf".to_string(),
        format!("-D__TARGET_ARCH_{arch}"),
        "-Wall".to_string(),
    ];
    // A build whose BPF object differs from the same source's, so that the
    // tests can show that two versions on one node never share a probe.
    if let Some(variant) = env::var_os("FREEZEFRAME_BPF_VARIANT") {
        let variant = variant.to_string_lossy();
        assert!(
            !variant.is_empty() && variant.bytes().all(|byte| byte.is_ascii_digit()),
            "FREEZEFRAME_BPF_VARIANT must be a number, not {variant:?}"
        );
        clang_args.push(format!("-DFREEZEFRAME_VARIANT={variant}"));
    }

    for program in PROGRAMS {
        let source = format!("bpf/{program}.bpf.c");
        let object = out_dir.join(format!("{program}.bpf.o"));
        SkeletonBuilder::new()
            .source(&source)
            .obj(&object)
            .clang_args(&clang_args)
            .build_and_generate(out_dir.join(format!("{program}.skel.rs")))
            .unwrap_or_else(|err| panic!("cannot build {source}: {err:#}"));
        // Instances share a pinned probe only if their objects are the same
        // bytes: the maps' layouts are then the same too.
        let bytes = fs::read(&object).unwrap_or_else(|err| panic!("cannot read {object:?}: {err}"));
        println!(
            "cargo:rustc-env=FREEZEFRAME_{}_VERSION={:016x}",
            program.to_uppercase(),
            fnv1a(&bytes)
        );
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed=bpf/offcpu.h");
    println!("cargo:rerun-if-env-changed=FREEZEFRAME_VMLINUX_H");
    println!("cargo:rerun-if-env-changed=FREEZEFRAME_BPF_VARIANT");
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn provide_vmlinux_h(out_dir: &Path) {
    let target = out_dir.join("vmlinux.h");
    if let Some(given) = env::var_os("FREEZEFRAME_VMLINUX_H") {
        fs::copy(&given, &target).unwrap_or_else(|err| {
            panic!(
                "cannot copy FREEZEFRAME_VMLINUX_H={}: {err}",
                Path::new(&given).display()
            )
        });
        return;
    }
    if !Path::new(KERNEL_BTF).exists() {
        panic!(
            "{KERNEL_BTF} is missing, so vmlinux.h cannot be generated: build on a kernel with \
             CONFIG_DEBUG_INFO_BTF=y or set FREEZEFRAME_VMLINUX_H to a vmlinux.h made elsewhere"
        );
    }
    let output = Command::new("bpftool")
        .args(["btf", "dump", "file", KERNEL_BTF, "format", "c"])
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run bpftool to generate vmlinux.h ({err}): install Debian's bpftool")
        });
    if !output.status.success() {
        panic!(
            "bpftool could not dump {KERNEL_BTF}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::write(&target, output.stdout).expect("cannot write vmlinux.h into OUT_DIR");
}

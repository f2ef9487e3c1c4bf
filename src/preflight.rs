//! Checks made before touching BPF, so that a missing privilege or kernel
//! feature is reported as what it is rather than as a loader errno.

use std::fs;
use std::path::Path;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing privileges: off-CPU capture needs root, or CAP_BPF and CAP_PERFMON \
         (effective capabilities here: {0:#x})"
    )]
    Privileges(u64),
    #[error(
        "{KERNEL_BTF} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), \
         which freezeframe's CO-RE programs need"
    )]
    NoBtf,
}

/// Effective capability set of this process, from /proc/self/status.
fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn has_capabilities(effective: u64) -> bool {
    let has = |cap: u32| effective & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

pub fn check_can_trace() -> Result<(), PreflightError> {
    let effective = effective_capabilities();
    if !has_capabilities(effective) {
        return Err(PreflightError::Privileges(effective));
    }
    if !Path::new(KERNEL_BTF).exists() {
        return Err(PreflightError::NoBtf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_and_perfmon_together_or_sys_admin_suffice() {
        assert!(has_capabilities(1 << CAP_SYS_ADMIN));
        assert!(has_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_capabilities(1 << CAP_BPF));
        assert!(!has_capabilities(0));
    }
}

//! Finding the process to capture: by pid, by name, or by the `process.pid`
//! an OTLP resource reports, which is a pid in the *application's* pid
//! namespace and may need translating into ours.

use std::collections::HashSet;
use std::fs;
use std::sync::{Arc, Mutex};

use crate::capture::recorder::Recorder;
use crate::config::Target;
use crate::signals::{Attributes, MetricBatch};
use crate::trigger::Firing;

/// OTLP resource attributes a process reports about itself.
const PROCESS_PID: &str = "process.pid";
const PROCESS_EXECUTABLE: &str = "process.executable.name";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("[target] pid {0} does not exist (in freezeframe's pid namespace)")]
    Gone(u32),
    #[error("cannot watch pid {pid}: {reason}")]
    Watch { pid: u32, reason: String },
}

/// Keeps the flight recorder pointed at the configured target, through
/// restarts (a process name that comes back with a new pid).
#[derive(Clone)]
pub struct Tracker {
    target: Target,
    recorder: Arc<Recorder>,
    /// The pid watched for a `Pid` or `ProcessName` target.
    current: Arc<Mutex<Option<u32>>>,
}

impl Tracker {
    pub fn new(target: Target, recorder: Arc<Recorder>) -> Self {
        Tracker {
            target,
            recorder,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// Re-resolves the target and points the recorder at it.
    pub fn refresh(&self) -> Result<(), TargetError> {
        let wanted = match &self.target {
            Target::Pid(pid) if alive(*pid) => Some(*pid),
            Target::Pid(pid) => return Err(TargetError::Gone(*pid)),
            Target::ProcessName(name) => by_name(name),
            Target::FromResource => return Ok(()),
        };
        let mut current = self.current.lock().expect("target lock");
        if *current == wanted {
            return Ok(());
        }
        if let Some(old) = current.take() {
            let _ = self.recorder.remove_target(old);
        }
        if let Some(pid) = wanted {
            self.watch(pid)?;
            tracing::info!(pid, "watching the target process");
        }
        *current = wanted;
        Ok(())
    }

    /// With no configured target, watches every process that reports its
    /// `process.pid` (the armed recorder must already be attached when the
    /// freeze starts).
    pub fn learn_from(&self, batch: &MetricBatch, learned: &mut HashSet<u32>) {
        let mut seen: HashSet<&Attributes> = HashSet::new();
        for point in &batch.points {
            if !seen.insert(&point.series.resource) {
                continue;
            }
            let Some(pid) = resource_pid(&point.series.resource) else {
                continue;
            };
            if learned.contains(&pid) {
                continue;
            }
            match self.watch(pid) {
                Ok(()) => {
                    tracing::info!(pid, "watching a process that reports its latency");
                    learned.insert(pid);
                }
                Err(err) => tracing::warn!("{err}"),
            }
        }
        learned.retain(|&pid| alive(pid) || self.recorder.remove_target(pid).is_err());
    }

    /// The process a firing's capture is for.
    pub fn resolve(&self, firing: &Firing) -> Option<u32> {
        match &self.target {
            Target::FromResource => firing
                .series
                .as_ref()
                .and_then(|series| resource_pid(&series.resource)),
            _ => {
                let _ = self.refresh();
                *self.current.lock().expect("target lock")
            }
        }
    }

    fn watch(&self, pid: u32) -> Result<(), TargetError> {
        self.recorder
            .add_target(pid)
            .map_err(|err| TargetError::Watch {
                pid,
                reason: err.to_string(),
            })
    }
}

/// The reporting process, in our pid namespace.
fn resource_pid(resource: &Attributes) -> Option<u32> {
    let reported = resource.get(PROCESS_PID)?.parse().ok()?;
    from_resource(
        reported,
        resource.get(PROCESS_EXECUTABLE).map(String::as_str),
    )
}

/// Whether a process with this pid exists in our pid namespace.
pub fn alive(pid: u32) -> bool {
    pid != 0 && fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// The newest process whose name (`comm`, or the executable's file name for
/// names longer than comm's 15 bytes) is `name`. The newest, because after a
/// restart the old instance may linger while it shuts down.
pub fn by_name(name: &str) -> Option<u32> {
    processes()
        .filter(|&pid| process_name_matches(pid, name))
        .max_by_key(|&pid| start_time(pid).unwrap_or(0))
}

/// Translates the pid an application reported about itself (OTLP resource
/// `process.pid`) into our pid namespace. The same namespace is the common
/// case (a pod with a shared process namespace); otherwise the process whose
/// innermost namespace pid (`NSpid`'s last field) matches, narrowed down by
/// the reported executable name when there are several.
pub fn from_resource(reported_pid: u32, executable: Option<&str>) -> Option<u32> {
    let name_ok = |pid: u32| executable.is_none_or(|name| process_name_matches(pid, name));
    if alive(reported_pid)
        && name_ok(reported_pid)
        && innermost_pid(reported_pid) == Some(reported_pid)
    {
        return Some(reported_pid);
    }
    let candidates: Vec<u32> = processes()
        .filter(|&pid| innermost_pid(pid) == Some(reported_pid) && name_ok(pid))
        .collect();
    match candidates.as_slice() {
        [only] => Some(*only),
        _ => None,
    }
}

fn processes() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
}

fn process_name_matches(pid: u32, name: &str) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim_end() == name {
        return true;
    }
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| exe.file_name().map(|file| file.to_string_lossy() == name))
        .unwrap_or(false)
}

/// The pid in the process's own (innermost) pid namespace.
pub(crate) fn innermost_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_innermost_nspid(&status)
}

fn parse_innermost_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .and_then(|pids| pids.split_whitespace().last())
        .and_then(|pid| pid.parse().ok())
}

/// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields count
    // from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_namespace_pid_is_the_last() {
        assert_eq!(
            parse_innermost_nspid("Name:\tx\nNSpid:\t48211\t7\t1\n"),
            Some(1)
        );
        assert_eq!(parse_innermost_nspid("NSpid:\t42\n"), Some(42));
        assert_eq!(parse_innermost_nspid("Name:\tx\n"), None);
    }

    #[test]
    fn our_own_process_is_found_every_way() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(start_time(me).is_some());
        assert_eq!(from_resource(me, None), Some(me));
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(from_resource(me, Some(comm.trim_end())), Some(me));
        assert_eq!(from_resource(me, Some("surely-not-this-process")), None);
        assert!(by_name(comm.trim_end()).is_some());
    }
}

//! Ctrl-C and SIGTERM during a build. The first signal stops the build:
//! every program stemforge started is killed (a chroot's namespace and its
//! mounts die with it, QEMU with its process), no new one starts, and the
//! build unwinds through its usual failure path, which removes the work
//! tree and every half-written output. If it has not finished within
//! [`GRACE`] (a long step that runs in-process), the paths registered with
//! [`remove_on_forced_stop`] are removed and the process exits.

use crate::progress;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long the build may take to unwind before it is stopped outright.
pub const GRACE: Duration = Duration::from_secs(3);

static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The phase the signal arrived in.
static PHASE: Mutex<String> = Mutex::new(String::new());
static FORCED_CLEANUP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The build was interrupted; callers match on it to exit 128 + signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {} during {phase}", signal_name(*.signal))]
pub struct Interrupted {
    pub signal: i32,
    pub phase: String,
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Handle SIGINT and SIGTERM from now on (for a build).
pub fn install() -> anyhow::Result<()> {
    use anyhow::Context;
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("handling Ctrl-C")?;
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            let phase = progress::current_phase();
            *PHASE.lock().unwrap_or_else(|p| p.into_inner()) = phase.clone();
            SIGNAL.store(sig, Ordering::SeqCst);
            progress::info(&format!(
                "\n{}: stopping",
                Interrupted { signal: sig, phase }
            ));
            // Programs started while the build unwinds are refused (see
            // `check`); the loop catches one that was starting just then.
            let until = Instant::now() + GRACE;
            while Instant::now() < until {
                kill_children();
                std::thread::sleep(Duration::from_millis(100));
            }
            let paths =
                std::mem::take(&mut *FORCED_CLEANUP.lock().unwrap_or_else(|p| p.into_inner()));
            for p in paths {
                let _ = crate::fsutil::remove_tree(&p);
            }
            // Straight to stderr and out: the main thread may hold the
            // progress lock, and exit handlers may wait on it.
            eprintln!("stopped");
            // SAFETY: _exit ends the process at once; nothing after runs.
            unsafe { libc::_exit(128 + sig) };
        })
        .context("starting the signal handler")?;
    Ok(())
}

/// The signal that interrupted the build, if one did.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The interruption, once there was one: its signal and the phase it
/// arrived in.
pub fn interrupted() -> Option<Interrupted> {
    signal().map(|signal| Interrupted {
        signal,
        phase: PHASE.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    })
}

/// `Err(Interrupted)` once the build was interrupted: nothing new starts.
pub fn check() -> Result<(), Interrupted> {
    match interrupted() {
        None => Ok(()),
        Some(i) => Err(i),
    }
}

/// A reader that fails once the build is interrupted, so long in-process
/// work (archiving, hashing) stops within one read.
pub struct Reader<R>(pub R);

impl<R: std::io::Read> std::io::Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Err(i) = check() {
            return Err(std::io::Error::other(i));
        }
        self.0.read(buf)
    }
}

/// Remove `path` if the build has to be stopped outright.
pub fn remove_on_forced_stop(path: PathBuf) {
    FORCED_CLEANUP
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path);
}

/// SIGKILL every child of this process. Each was started by `exec` with
/// PR_SET_PDEATHSIG; chroots run under `unshare --kill-child`, so their
/// whole PID namespace goes with them.
fn kill_children() {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if parent_of(pid) == Some(me) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The parent pid from /proc/PID/stat (the field after the command name,
/// which may itself hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_reads_stat() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent_of(child.id()), Some(std::process::id()));
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn not_interrupted_by_default() {
        assert!(check().is_ok());
        assert_eq!(signal(), None);
    }
}

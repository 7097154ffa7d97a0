//! The one way stemforge runs external commands.
//!
//! Every command line is logged before it runs. A command that fails is
//! reported with its command line, its exit status and the tail of its
//! stderr. Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so nothing stemforge
//! starts (QEMU, a chroot, mmdebstrap) outlives a killed stemforge.

use crate::progress;
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How many stderr lines a failure report carries.
const TAIL_LINES: usize = 25;

/// A command that failed: what ran, how it ended, what it said last.
#[derive(Debug, thiserror::Error)]
#[error("command failed ({status}): {command}{}", tail_block(.tail))]
pub struct CommandFailed {
    pub command: String,
    pub status: String,
    pub tail: String,
}

fn tail_block(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its output ---\n{}", tail.trim_end())
    }
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A command to run; build it with [`cmd`].
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    dir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    clear_env: bool,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
}

/// A command with arguments.
pub fn cmd<I, S>(program: impl AsRef<OsStr>, args: I) -> Cmd
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Cmd {
        program: program.as_ref().to_owned(),
        args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
        dir: None,
        env: Vec::new(),
        clear_env: false,
        stdin: None,
        timeout: None,
    }
}

impl Cmd {
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Several variables at once.
    pub fn envs(mut self, pairs: &[(&str, &str)]) -> Self {
        for (k, v) in pairs {
            self.env.push((k.into(), v.into()));
        }
        self
    }

    /// Start from an empty environment (plus what [`Cmd::env`] adds).
    pub fn clear_env(mut self) -> Self {
        self.clear_env = true;
        self
    }

    pub fn stdin_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Kill the command and fail if it runs longer than `d`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    pub fn program(&self) -> &OsStr {
        &self.program
    }

    pub fn arguments(&self) -> &[OsString] {
        &self.args
    }

    /// The command line, shell-quoted, as it is logged.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn expression(&self) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args).unchecked();
        if self.clear_env {
            e = e.full_env(self.env.iter().cloned());
        } else {
            for (k, v) in &self.env {
                e = e.env(k, v);
            }
        }
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        e = match &self.stdin {
            Some(b) => e.stdin_bytes(b.clone()),
            None => e.stdin_null(),
        };
        e.before_spawn(|c| {
            // SAFETY: prctl is async-signal-safe and touches no memory.
            unsafe {
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    Ok(())
                });
            }
            Ok(())
        })
    }

    fn announce(&self) -> String {
        let line = self.display();
        progress::detail(&format!("$ {line}"));
        let short: String = line.chars().take(100).collect();
        progress::command_activity(&short);
        line
    }

    /// Run to completion; a non-zero exit is an error ([`CommandFailed`]).
    pub fn run(&self) -> Result<Output> {
        let out = self.run_unchecked()?;
        if !out.status.success() {
            return Err(self.failure(&out).into());
        }
        Ok(out)
    }

    /// Run to completion and return stdout as text.
    pub fn read(&self) -> Result<String> {
        Ok(self.run()?.stdout_str())
    }

    /// Run to completion, whatever the exit status. Errors only when the
    /// program cannot be started or exceeds its timeout.
    pub fn run_unchecked(&self) -> Result<Output> {
        crate::interrupt::check()?;
        let line = self.announce();
        let t0 = Instant::now();
        let expr = self.expression().stdout_capture().stderr_capture();
        let handle = expr
            .start()
            .with_context(|| format!("cannot start {}", self.program.to_string_lossy()))?;
        let raw = match self.timeout {
            None => handle
                .into_output()
                .with_context(|| format!("waiting for {line}"))?,
            Some(limit) => match handle
                .wait_timeout(limit)
                .with_context(|| format!("waiting for {line}"))?
            {
                Some(_) => handle.into_output()?,
                None => {
                    let _ = handle.kill();
                    anyhow::bail!(CommandFailed {
                        command: line,
                        status: format!("timed out after {} s", limit.as_secs()),
                        tail: String::new(),
                    });
                }
            },
        };
        let out = Output {
            status: raw.status,
            stdout: raw.stdout,
            stderr: raw.stderr,
            elapsed: t0.elapsed(),
        };
        progress::log_only(&out.stderr_str());
        progress::detail(&format!(
            "  ({}, {:.1} s)",
            describe_status(out.status),
            out.elapsed.as_secs_f64()
        ));
        Ok(out)
    }

    /// The error for a finished command that failed.
    pub fn failure(&self, out: &Output) -> CommandFailed {
        let text = if out.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
            out.stderr_str()
        } else {
            out.stdout_str()
        };
        CommandFailed {
            command: self.display(),
            status: describe_status(out.status),
            tail: tail(&text, TAIL_LINES),
        }
    }

    /// Start the command in the background with stdout and stderr going to
    /// files (for long-running programs such as QEMU).
    pub fn spawn(&self, stdout: &Path, stderr: &Path) -> Result<Running> {
        crate::interrupt::check()?;
        let line = self.announce();
        let handle = self
            .expression()
            .stdout_path(stdout)
            .stderr_path(stderr)
            .start()
            .with_context(|| format!("cannot start {}", self.program.to_string_lossy()))?;
        Ok(Running {
            handle,
            line,
            stderr: stderr.to_path_buf(),
        })
    }
}

/// A command running in the background. Dropping it kills it.
pub struct Running {
    handle: duct::Handle,
    line: String,
    stderr: PathBuf,
}

impl Running {
    /// `Some(status)` once the program has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(self.handle.try_wait()?.map(|o| o.status))
    }

    /// Wait up to `limit`; `None` if still running.
    pub fn wait_timeout(&self, limit: Duration) -> Result<Option<ExitStatus>> {
        Ok(self.handle.wait_timeout(limit)?.map(|o| o.status))
    }

    pub fn kill(&self) {
        let _ = self.handle.kill();
    }

    pub fn pids(&self) -> Vec<u32> {
        self.handle.pids()
    }

    pub fn command_line(&self) -> &str {
        &self.line
    }

    /// The last lines the program wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| tail(&String::from_utf8_lossy(&b), TAIL_LINES))
            .unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.handle.try_wait() {
            let _ = self.handle.kill();
        }
    }
}

/// `exit status 3`, `killed by signal 9`.
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".to_string(),
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Quote `s` for a POSIX shell when it needs it (plain words, options and
/// paths stay as they are, for readable logs).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        return s.to_string();
    }
    match shlex::try_quote(s) {
        Ok(q) => q.into_owned(),
        // Only NUL bytes cannot be quoted; show them escaped.
        Err(_) => format!("{s:?}"),
    }
}

/// Whether `program` can be found on PATH (or is an existing path).
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    // Root's tools live in sbin, which a user's PATH may lack.
    let extra: OsString = "/usr/sbin:/sbin".into();
    std::env::split_paths(&path)
        .chain(std::env::split_paths(&extra))
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_captures_stdout() {
        let out = cmd("sh", ["-c", "echo hello; echo note >&2"])
            .run()
            .unwrap();
        assert_eq!(out.stdout_str(), "hello\n");
        assert_eq!(out.stderr_str(), "note\n");
    }

    #[test]
    fn failure_reports_command_status_and_stderr_tail() {
        let err = cmd(
            "sh",
            [
                "-c",
                "for i in $(seq 1 40); do echo line$i >&2; done; exit 3",
            ],
        )
        .run()
        .unwrap_err();
        let f = err.downcast_ref::<CommandFailed>().expect("CommandFailed");
        assert_eq!(f.status, "exit status 3");
        assert!(f.command.starts_with("sh -c"));
        assert!(f.tail.contains("line40"));
        assert!(!f.tail.contains("line10\n"), "only the tail: {}", f.tail);
        let shown = err.to_string();
        assert!(
            shown.contains("exit status 3") && shown.contains("line40"),
            "{shown}"
        );
    }

    #[test]
    fn missing_program_is_an_error_naming_it() {
        let err = cmd("stemforge-no-such-program", ["x"]).run().unwrap_err();
        assert!(format!("{err:#}").contains("stemforge-no-such-program"));
    }

    #[test]
    fn timeout_kills() {
        let t0 = Instant::now();
        let err = cmd("sleep", ["30"])
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn clear_env_and_stdin() {
        let out = cmd(
            "/bin/sh",
            ["-c", "echo \"${FOO:-unset}${HOME:-nohome}\"; cat"],
        )
        .clear_env()
        .env("FOO", "bar")
        .stdin_bytes("in")
        .run()
        .unwrap();
        assert_eq!(out.stdout_str(), "barnohome\nin");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d=e"), "abc/d=e");
        for s in ["a b", "it's", "", "$HOME;rm", "x\ny"] {
            let q = shell_quote(s);
            assert_eq!(shlex::split(&q).unwrap(), vec![s.to_string()], "{q}");
        }
    }
}

//! Named, timed steps; a spinner on long work; a summary at the end.
//!
//! Everything a step prints goes to stderr; the build log (when set) gets
//! every line, including the command lines and output that `exec` records.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct State {
    verbose: bool,
    quiet: bool,
    log: Option<File>,
    bar: Option<ProgressBar>,
    /// The step running now and what it is doing (for an interruption's
    /// message).
    phase: String,
    activity: String,
}

static STATE: Mutex<State> = Mutex::new(State {
    verbose: false,
    quiet: false,
    log: None,
    bar: None,
    phase: String::new(),
    activity: String::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Set how chatty stderr is. `verbose` also shows every command line.
pub fn init(verbose: bool, quiet: bool) {
    let mut s = state();
    s.verbose = verbose;
    s.quiet = quiet;
}

/// Append every later log line to `path` (the build log).
pub fn set_log_file(path: &Path) -> Result<()> {
    use anyhow::Context;
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening build log {}", path.display()))?;
    state().log = Some(f);
    Ok(())
}

/// Stop writing to the build log.
pub fn close_log_file() {
    state().log = None;
}

fn emit(line: &str, to_stderr: bool) {
    let mut s = state();
    if let Some(f) = s.log.as_mut() {
        let _ = writeln!(f, "{line}");
    }
    if to_stderr && !s.quiet {
        match &s.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

/// A line the user should see.
pub fn info(msg: &str) {
    emit(msg, true);
}

/// A warning the user should see.
pub fn warn(msg: &str) {
    emit(&format!("warning: {msg}"), true);
}

/// A line for the build log (and stderr with `--verbose`).
pub fn detail(msg: &str) {
    let verbose = state().verbose;
    emit(msg, verbose);
}

/// Raw text for the build log only (command output).
pub fn log_only(text: &str) {
    let mut s = state();
    if let Some(f) = s.log.as_mut() {
        let _ = f.write_all(text.as_bytes());
        if !text.ends_with('\n') {
            let _ = f.write_all(b"\n");
        }
    }
}

/// Show `msg` next to the running step's spinner.
pub fn activity(msg: &str) {
    detail(&format!("-- {msg}"));
    command_activity(msg);
}

/// The spinner's message for a command `exec` runs (its command line is
/// logged already).
pub fn command_activity(msg: &str) {
    let mut s = state();
    s.activity = msg.to_string();
    if let Some(bar) = &s.bar {
        bar.set_message(msg.to_string());
    }
}

/// "disk (mkfs.ext4 ...)": the step running now and its activity.
pub fn current_phase() -> String {
    let s = state();
    match (s.phase.as_str(), s.activity.as_str()) {
        ("", _) => "the start".to_string(),
        (p, "") => format!("the {p} step"),
        (p, a) => format!("the {p} step ({a})"),
    }
}

/// One finished step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub name: String,
    pub seconds: f64,
    pub status: StepStatus,
    /// A short note: "cache hit", "143 MiB", "skipped: --no-verify".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Ok,
    Failed,
    Skipped,
}

/// The steps of one command run, in order.
#[derive(Debug)]
pub struct Steps {
    started: Instant,
    records: Vec<StepRecord>,
    note: Mutex<String>,
}

impl Default for Steps {
    fn default() -> Self {
        Self::new()
    }
}

impl Steps {
    pub fn new() -> Self {
        Steps {
            started: Instant::now(),
            records: Vec::new(),
            note: Mutex::new(String::new()),
        }
    }

    /// Run `f` as the step `name`, timed, with a spinner while it runs.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce(&Steps) -> Result<T>) -> Result<T> {
        info(&format!("==> {name}"));
        crate::interrupt::check()?;
        let bar = spinner(name);
        {
            let mut s = state();
            s.bar = bar.clone();
            s.phase = name.to_string();
            s.activity.clear();
        }
        *self.note.lock().unwrap_or_else(|p| p.into_inner()) = String::new();
        let t0 = Instant::now();
        // A failure names its step: "the disk step: making the / file
        // system: ...".
        let result = {
            use anyhow::Context;
            f(self).with_context(|| format!("the {name} step"))
        };
        let seconds = t0.elapsed().as_secs_f64();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        state().bar = None;
        let note = std::mem::take(&mut *self.note.lock().unwrap_or_else(|p| p.into_inner()));
        let status = if result.is_ok() {
            StepStatus::Ok
        } else {
            StepStatus::Failed
        };
        let suffix = if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        };
        match status {
            StepStatus::Ok => info(&format!("    {name}: done in {seconds:.1} s{suffix}")),
            _ => info(&format!("    {name}: FAILED after {seconds:.1} s{suffix}")),
        }
        self.records.push(StepRecord {
            name: name.to_string(),
            seconds,
            status,
            note,
        });
        result
    }

    /// Record a step that did not run, and why.
    pub fn skip(&mut self, name: &str, why: &str) {
        info(&format!("==> {name}: skipped ({why})"));
        self.records.push(StepRecord {
            name: name.to_string(),
            seconds: 0.0,
            status: StepStatus::Skipped,
            note: why.to_string(),
        });
    }

    /// Record a part of the step that just ran, timed by its caller (parts
    /// that ran side by side): shown indented under it.
    pub fn record_sub(&mut self, name: &str, seconds: f64, note: &str) {
        self.records.push(StepRecord {
            name: format!("  {name}"),
            seconds,
            status: StepStatus::Ok,
            note: note.to_string(),
        });
    }

    /// Attach a short note to the running step (shown in the summary).
    pub fn note(&self, note: impl Into<String>) {
        let mut n = self.note.lock().unwrap_or_else(|p| p.into_inner());
        let note = note.into();
        if n.is_empty() {
            *n = note;
        } else {
            n.push_str(", ");
            n.push_str(&note);
        }
    }

    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }

    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }

    /// The step duration report printed at the end of a build.
    pub fn summary_table(&self) -> String {
        let width = self
            .records
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(5);
        let mut out = format!("{:<width$}  {:>8}  {}\n", "step", "time", "result");
        for r in &self.records {
            let result = match r.status {
                StepStatus::Ok => "ok",
                StepStatus::Failed => "FAILED",
                StepStatus::Skipped => "skipped",
            };
            let note = if r.note.is_empty() {
                String::new()
            } else {
                format!("  {}", r.note)
            };
            out.push_str(&format!(
                "{:<width$}  {:>6.1} s  {result}{note}\n",
                r.name, r.seconds
            ));
        }
        out.push_str(&format!(
            "{:<width$}  {:>6.1} s\n",
            "total",
            self.total().as_secs_f64()
        ));
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "steps": self.records,
            "total_seconds": self.total().as_secs_f64(),
        })
    }
}

fn spinner(name: &str) -> Option<ProgressBar> {
    if state().quiet {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if bar.is_hidden() {
        return None;
    }
    let style = ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_record_status_and_notes() {
        init(false, true);
        let mut steps = Steps::new();
        steps
            .run("one", |s| {
                s.note("cache hit");
                Ok(())
            })
            .unwrap();
        let r: Result<()> = steps.run("two", |_| anyhow::bail!("boom"));
        assert!(r.is_err());
        steps.skip("three", "--no-verify");
        let recs = steps.records();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].note, "cache hit");
        assert_eq!(recs[1].status, StepStatus::Failed);
        assert_eq!(recs[2].status, StepStatus::Skipped);
        let table = steps.summary_table();
        assert!(table.contains("FAILED"), "{table}");
        assert!(table.lines().last().unwrap().starts_with("total"));
    }
}

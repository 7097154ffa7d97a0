//! The result of evaluating one check: a status and the evidence that
//! decided it (file:line, or the command output that was read).

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    NotApplicable,
    Error,
    /// Failed, with a current waiver (see [`super::waiver`]).
    Waived,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::NotApplicable => "not_applicable",
            Status::Waived => "waived",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: Status,
    pub evidence: Vec<String>,
}

impl Outcome {
    pub fn new(status: Status, evidence: Vec<String>) -> Self {
        Outcome { status, evidence }
    }
    pub fn pass(e: impl Into<String>) -> Self {
        Outcome::new(Status::Pass, vec![e.into()])
    }
    pub fn fail(e: impl Into<String>) -> Self {
        Outcome::new(Status::Fail, vec![e.into()])
    }
    pub fn na(e: impl Into<String>) -> Self {
        Outcome::new(Status::NotApplicable, vec![e.into()])
    }
    pub fn error(e: impl Into<String>) -> Self {
        Outcome::new(Status::Error, vec![e.into()])
    }
}

/// Collects the findings of a check with several assertions: it fails if
/// any assertion fails, errors if any cannot be evaluated, and is not
/// applicable if nothing could be tested on this kind of target.
#[derive(Debug, Default)]
pub struct Findings {
    evidence: Vec<String>,
    failed: bool,
    errored: bool,
    tested: bool,
}

impl Findings {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ok(&mut self, e: impl Into<String>) {
        self.tested = true;
        self.evidence.push(e.into());
    }
    pub fn bad(&mut self, e: impl Into<String>) {
        self.tested = true;
        self.failed = true;
        self.evidence.push(e.into());
    }
    pub fn err(&mut self, e: impl Into<String>) {
        self.errored = true;
        self.evidence.push(e.into());
    }
    /// Evidence that decides nothing (context, skipped parts).
    pub fn note(&mut self, e: impl Into<String>) {
        self.evidence.push(e.into());
    }
    pub fn check(&mut self, passed: bool, e: impl Into<String>) {
        if passed { self.ok(e) } else { self.bad(e) }
    }
    /// A rule whose offenders are listed: `ok` when there are none, or
    /// `what: a, b` naming them.
    pub fn none_of(&mut self, offenders: &[String], ok: impl Into<String>, what: &str) {
        if offenders.is_empty() {
            self.ok(ok);
        } else {
            self.bad(format!("{what}: {}", offenders.join(", ")));
        }
    }

    pub fn has_failed(&self) -> bool {
        self.failed
    }
    pub fn finish(self) -> Outcome {
        let status = if self.errored {
            Status::Error
        } else if self.failed {
            Status::Fail
        } else if self.tested {
            Status::Pass
        } else {
            Status::NotApplicable
        };
        Outcome::new(status, self.evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_fold_to_the_worst() {
        let mut f = Findings::new();
        f.ok("a");
        assert_eq!(Findings::new().finish().status, Status::NotApplicable);
        let mut g = Findings::new();
        g.ok("a");
        g.bad("b");
        assert_eq!(g.finish().status, Status::Fail);
        f.err("c");
        assert_eq!(f.finish().status, Status::Error);
    }
}

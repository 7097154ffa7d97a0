//! Waivers: recorded exceptions an approver signed, each with a reason
//! and an expiry date, optionally only for some profiles or roles. A
//! failing control with a current waiver reports `waived` with the
//! reason, never `pass`; an expired waiver is reported as expired and the
//! control keeps failing. A waiver file naming a control the catalog
//! does not have is an error with the file, line and id.

use super::outcome::Status;
use super::{ControlResult, Report};
use crate::config::{ConfigError, locate_all, parse_yaml};
use crate::stage::Catalog;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaiverFile {
    waivers: Vec<Waiver>,
}

/// One exception, as the file states it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waiver {
    pub control: String,
    pub reason: String,
    pub approver: String,
    /// The last day it holds (UTC), `YYYY-MM-DD`.
    pub expires: NaiveDate,
    /// Only for images of these profiles (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Only for targets with one of these roles (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// A waiver as a control's result carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Applied {
    pub reason: String,
    pub approver: String,
    pub expires: NaiveDate,
    /// Past its date when the scan ran: the control fails.
    pub expired: bool,
}

/// Load and check a waiver file against the catalog.
pub fn load(file: &Path, catalog: &Catalog) -> Result<Vec<Waiver>, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, format!("cannot read the waiver file: {e}")))?;
    let parsed: WaiverFile = parse_yaml(file, &text)?;
    // Every waiver has each of its keys once (the parser saw to that), so
    // the i-th `key:` line of the file is the i-th waiver's.
    let line_of = |i: usize, key: &str| {
        locate_all(&text, &format!(r"^\s*(-\s*)?{key}\s*:"))
            .get(i)
            .copied()
    };
    for (i, w) in parsed.waivers.iter().enumerate() {
        let at = |key: &str, msg: String| {
            ConfigError::new(file, msg)
                .with_line(line_of(i, key))
                .with_key(format!("waivers[{i}].{key}"))
        };
        if !catalog.controls().any(|(_, c)| c.id == w.control) {
            return Err(at(
                "control",
                format!(
                    "no control `{}` in the catalog (see `stemforge controls`)",
                    w.control
                ),
            ));
        }
        for (key, value) in [("reason", &w.reason), ("approver", &w.approver)] {
            if value.trim().is_empty() {
                return Err(at(
                    key,
                    format!(
                        "the waiver of `{}` needs a reason and an approver",
                        w.control
                    ),
                ));
            }
        }
    }
    Ok(parsed.waivers)
}

/// Apply the waivers to a report scanned on `today` for `profile`.
pub fn apply(report: &mut Report, waivers: &[Waiver], profile: &str, today: NaiveDate) {
    for c in report.results.iter_mut() {
        let Some(w) = waivers.iter().find(|w| {
            w.control == c.id
                && (w.profiles.is_empty() || w.profiles.iter().any(|p| p == profile))
                && (w.roles.is_empty() || w.roles.iter().any(|r| report.context.roles.contains(r)))
        }) else {
            continue;
        };
        waive(c, w, today);
    }
    report.summary = super::summarize(&report.results);
}

fn waive(c: &mut ControlResult, w: &Waiver, today: NaiveDate) {
    let expired = today > w.expires;
    c.waiver = Some(Applied {
        reason: w.reason.clone(),
        approver: w.approver.clone(),
        expires: w.expires,
        expired,
    });
    match (c.status, expired) {
        (Status::Fail | Status::Error, false) => {
            c.evidence.insert(
                0,
                format!("waived until {} by {}: {}", w.expires, w.approver, w.reason),
            );
            c.status = Status::Waived;
        }
        (Status::Fail | Status::Error, true) => {
            c.evidence.insert(
                0,
                format!(
                    "waiver EXPIRED on {} (approved by {}): {}",
                    w.expires, w.approver, w.reason
                ),
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status) -> ControlResult {
        ControlResult {
            id: "sshd-idle-timeout".into(),
            title: "t".into(),
            severity: crate::stage::Severity::Medium,
            stage: "sshd".into(),
            refs: Default::default(),
            check: "c".into(),
            status,
            evidence: vec!["ClientAliveInterval 0".into()],
            waiver: None,
        }
    }

    #[test]
    fn a_current_waiver_waives_an_expired_one_fails() {
        let w = Waiver {
            control: "sshd-idle-timeout".into(),
            reason: "vendor agent needs long sessions".into(),
            approver: "ISSM".into(),
            expires: NaiveDate::from_ymd_opt(2027, 1, 31).unwrap(),
            profiles: vec![],
            roles: vec![],
        };
        let mut c = result(Status::Fail);
        waive(&mut c, &w, NaiveDate::from_ymd_opt(2027, 1, 31).unwrap());
        assert_eq!(c.status, Status::Waived);
        assert!(c.evidence[0].contains("waived until 2027-01-31 by ISSM"));
        let mut c = result(Status::Fail);
        waive(&mut c, &w, NaiveDate::from_ymd_opt(2027, 2, 1).unwrap());
        assert_eq!(c.status, Status::Fail);
        assert!(c.waiver.as_ref().unwrap().expired);
        assert!(c.evidence[0].contains("EXPIRED"));
        // A passing control stays a pass; the waiver is recorded, unused.
        let mut c = result(Status::Pass);
        waive(&mut c, &w, NaiveDate::from_ymd_opt(2027, 1, 1).unwrap());
        assert_eq!(c.status, Status::Pass);
    }

    #[test]
    fn an_unknown_control_is_named_with_its_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("waivers.yml");
        std::fs::write(
            &f,
            "waivers:\n  - control: sshd-idle-timeout\n    reason: r\n    approver: a\n    expires: 2027-01-01\n  - control: no-such-control\n    reason: r\n    approver: a\n    expires: 2027-01-01\n",
        )
        .unwrap();
        let catalog = Catalog::load(&crate::stage::StageSource::Embedded).unwrap();
        let e = load(&f, &catalog).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().contains("no-such-control"), "{e}");
        std::fs::write(&f, "waivers:\n  - control: sshd-idle-timeout\n    reason: r\n    approver: a\n    expires: someday\n").unwrap();
        let e = load(&f, &catalog).unwrap_err();
        assert!(e.to_string().contains("expires"), "{e}");
    }
}

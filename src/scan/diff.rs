//! Compare two scan reports (`stemforge diff OLD.json NEW.json`): what
//! regressed (passed or did not apply, now fails or errs; a new control
//! that fails; a waiver that lapsed), what was fixed, which controls are
//! new or gone, and which waivers changed. A nightly job gates on the
//! regressions.

use super::outcome::Status;
use super::{ControlResult, Report};
use quick_xml::events::BytesText;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Regression,
    Fix,
    New,
    Removed,
    WaiverChanged,
}

impl Change {
    fn heading(self) -> &'static str {
        match self {
            Change::Regression => "regressions",
            Change::Fix => "fixes",
            Change::New => "new controls",
            Change::Removed => "removed controls",
            Change::WaiverChanged => "waiver changes",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub change: Change,
    pub id: String,
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<Status>,
    /// The new evidence (the old for a removed control).
    pub evidence: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub old: String,
    pub new: String,
    pub regressions: usize,
    pub entries: Vec<Entry>,
}

fn failing(s: Status) -> bool {
    matches!(s, Status::Fail | Status::Error)
}

fn entry(change: Change, o: Option<&ControlResult>, n: Option<&ControlResult>) -> Entry {
    let c = n.or(o).expect("one side exists");
    Entry {
        change,
        id: c.id.clone(),
        title: c.title.clone(),
        old: o.map(|c| c.status),
        new: n.map(|c| c.status),
        evidence: c.evidence.clone(),
    }
}

/// What changed from `old` to `new`.
pub fn diff(old: &Report, new: &Report, old_name: &str, new_name: &str) -> Diff {
    let mut entries = Vec::new();
    for n in &new.results {
        let o = old.result(&n.id);
        match o {
            None => {
                let change = if failing(n.status) {
                    Change::Regression
                } else {
                    Change::New
                };
                entries.push(entry(change, None, Some(n)));
            }
            Some(o) => {
                if failing(n.status) && !failing(o.status) {
                    entries.push(entry(Change::Regression, Some(o), Some(n)));
                } else if failing(o.status) || o.status == Status::Waived {
                    if n.status == Status::Pass {
                        entries.push(entry(Change::Fix, Some(o), Some(n)));
                    } else if o.waiver != n.waiver {
                        entries.push(entry(Change::WaiverChanged, Some(o), Some(n)));
                    }
                } else if o.waiver != n.waiver
                    || (n.status == Status::Waived) != (o.status == Status::Waived)
                {
                    entries.push(entry(Change::WaiverChanged, Some(o), Some(n)));
                }
            }
        }
    }
    for o in &old.results {
        if new.result(&o.id).is_none() {
            entries.push(entry(Change::Removed, Some(o), None));
        }
    }
    entries.sort_by_key(|e| e.change as u8);
    Diff {
        old: old_name.into(),
        new: new_name.into(),
        regressions: entries
            .iter()
            .filter(|e| e.change == Change::Regression)
            .count(),
        entries,
    }
}

fn status(s: Option<Status>) -> &'static str {
    s.map(Status::as_str).unwrap_or("absent")
}

pub fn render_text(d: &Diff) -> String {
    let mut out = format!("stemforge diff {} -> {}\n", d.old, d.new);
    for change in [
        Change::Regression,
        Change::Fix,
        Change::New,
        Change::Removed,
        Change::WaiverChanged,
    ] {
        let of: Vec<&Entry> = d.entries.iter().filter(|e| e.change == change).collect();
        if of.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{} ({}):\n", change.heading(), of.len()));
        for e in of {
            out.push_str(&format!(
                "  {:<40} {} -> {}  {}\n",
                e.id,
                status(e.old),
                status(e.new),
                e.title
            ));
            if change == Change::Regression || change == Change::WaiverChanged {
                for ev in e.evidence.iter().take(3) {
                    out.push_str(&format!("      {ev}\n"));
                }
            }
        }
    }
    if d.entries.is_empty() {
        out.push_str("\nno changes\n");
    }
    out.push_str(&format!("\n{} regressions\n", d.regressions));
    out
}

pub fn render_json(d: &Diff) -> String {
    serde_json::to_string_pretty(d).expect("a diff serializes") + "\n"
}

/// One testsuite; a regression is a failing testcase, everything else
/// passes with what changed on its output.
pub fn render_junit(d: &Diff) -> String {
    super::report::xml_document((b' ', 2), |w| {
        let name = format!("stemforge diff {} -> {}", d.old, d.new);
        w.create_element("testsuites").write_inner_content(|w| {
            w.create_element("testsuite")
                .with_attribute(("name", name.as_str()))
                .with_attribute(("tests", d.entries.len().to_string().as_str()))
                .with_attribute(("failures", d.regressions.to_string().as_str()))
                .with_attribute(("errors", "0"))
                .write_inner_content(|w| {
                    for e in &d.entries {
                        let title = format!("{}: {} -> {}", e.id, status(e.old), status(e.new));
                        let class = format!("stemforge.diff.{}", change_name(e.change));
                        let el = w
                            .create_element("testcase")
                            .with_attribute(("name", title.as_str()))
                            .with_attribute(("classname", class.as_str()));
                        let text = e.evidence.join("\n");
                        if e.change == Change::Regression {
                            el.write_inner_content(|w| {
                                w.create_element("failure")
                                    .with_attribute(("message", e.title.as_str()))
                                    .with_attribute(("type", "regression"))
                                    .write_text_content(BytesText::new(&text))?;
                                Ok(())
                            })?;
                        } else {
                            el.write_inner_content(|w| {
                                w.create_element("system-out")
                                    .write_text_content(BytesText::new(&text))?;
                                Ok(())
                            })?;
                        }
                    }
                    Ok(())
                })?;
            Ok(())
        })?;
        Ok(())
    })
}

fn change_name(c: Change) -> &'static str {
    match c {
        Change::Regression => "regression",
        Change::Fix => "fix",
        Change::New => "new",
        Change::Removed => "removed",
        Change::WaiverChanged => "waiver",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{ScanContext, Summary, TargetInfo};

    fn report(results: Vec<(&str, Status)>) -> Report {
        Report {
            scanner: "stemforge".into(),
            version: "0".into(),
            target: TargetInfo {
                kind: "root".into(),
                path: "/x".into(),
            },
            context: ScanContext {
                distro: "debian".into(),
                codename: "bookworm".into(),
                version: "12".into(),
                pretty_name: String::new(),
                roles: vec![],
                roles_from: "none".into(),
                profile: String::new(),
            },
            started: String::new(),
            duration_ms: 0,
            summary: Summary::default(),
            results: results
                .into_iter()
                .map(|(id, status)| ControlResult {
                    id: id.into(),
                    title: id.into(),
                    severity: crate::stage::Severity::Medium,
                    stage: "s".into(),
                    refs: Default::default(),
                    check: String::new(),
                    status,
                    evidence: vec![format!("{id} evidence")],
                    waiver: None,
                })
                .collect(),
        }
    }

    #[test]
    fn regressions_fixes_and_membership() {
        let old = report(vec![
            ("a", Status::Pass),
            ("b", Status::Fail),
            ("c", Status::Pass),
            ("gone", Status::Pass),
            ("w", Status::Waived),
        ]);
        let new = report(vec![
            ("a", Status::Fail),
            ("b", Status::Pass),
            ("c", Status::Pass),
            ("added", Status::Pass),
            ("added-failing", Status::Fail),
            ("w", Status::Fail),
        ]);
        let d = diff(&old, &new, "old.json", "new.json");
        let of = |c: Change| -> Vec<&str> {
            d.entries
                .iter()
                .filter(|e| e.change == c)
                .map(|e| e.id.as_str())
                .collect()
        };
        assert_eq!(of(Change::Regression), vec!["a", "added-failing", "w"]);
        assert_eq!(of(Change::Fix), vec!["b"]);
        assert_eq!(of(Change::New), vec!["added"]);
        assert_eq!(of(Change::Removed), vec!["gone"]);
        assert_eq!(d.regressions, 3);
        assert!(render_text(&d).contains("3 regressions"));
        assert!(render_junit(&d).contains("type=\"regression\""));
        let same = diff(&new, &new, "a", "b");
        assert_eq!(same.regressions, 0);
        assert!(render_text(&same).contains("no changes"));
    }
}

//! The scan as JUnit XML (the Surefire schema CI systems read): one
//! `testsuite` per stage, one `testcase` per control; a failed control
//! carries a `failure` with its evidence, one that could not be
//! evaluated an `error`, one that does not apply is `skipped` with the
//! reason. Written with quick-xml's writer, never by string formatting.

use super::outcome::Status;
use super::{ControlResult, Report};
use quick_xml::Writer;
use quick_xml::events::BytesText;
use std::collections::BTreeMap;

type W = Writer<Vec<u8>>;
type Res = std::io::Result<()>;

/// What the failure's body says: evidence, references, the fix.
fn body(c: &ControlResult) -> String {
    let mut s = c.evidence.join("\n");
    let refs = super::report::refs_text(c);
    if !refs.is_empty() {
        s.push_str(&format!("\nreferences: {refs}"));
    }
    s.push_str(&format!("\ncheck: {}", c.check));
    s
}

fn testcase(w: &mut W, c: &ControlResult, stage: &str) -> Res {
    testcase_in(w, c, &format!("stemforge.{stage}"))
}

/// A control's `testcase` under `classname`.
pub(crate) fn testcase_in(w: &mut W, c: &ControlResult, classname: &str) -> Res {
    let title = format!("{}: {}", c.id, c.title);
    let el = w
        .create_element("testcase")
        .with_attribute(("name", title.as_str()))
        .with_attribute(("classname", classname))
        .with_attribute(("time", "0"));
    let first = c.evidence.first().cloned().unwrap_or_default();
    match c.status {
        Status::Pass => {
            el.write_inner_content(|w| {
                w.create_element("system-out")
                    .write_text_content(BytesText::new(&c.evidence.join("\n")))?;
                Ok(())
            })?;
        }
        Status::Fail | Status::Error => {
            let (tag, kind) = if c.status == Status::Fail {
                ("failure", c.severity.as_str())
            } else {
                ("error", "error")
            };
            let text = body(c);
            el.write_inner_content(|w| {
                w.create_element(tag)
                    .with_attribute(("message", first.as_str()))
                    .with_attribute(("type", kind))
                    .write_text_content(BytesText::new(&text))?;
                Ok(())
            })?;
        }
        Status::NotApplicable | Status::Waived => {
            el.write_inner_content(|w| {
                w.create_element("skipped")
                    .with_attribute(("message", first.as_str()))
                    .write_empty()?;
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// The report as JUnit XML.
pub fn render(r: &Report) -> String {
    let mut by_stage: BTreeMap<&str, Vec<&ControlResult>> = BTreeMap::new();
    for c in &r.results {
        by_stage.entry(c.stage.as_str()).or_default().push(c);
    }
    let count = |v: &[&ControlResult], s: Status| v.iter().filter(|c| c.status == s).count();
    let secs = format!("{:.3}", r.duration_ms as f64 / 1000.0);
    let name = format!("stemforge scan of {} {}", r.target.kind, r.target.path);
    super::report::xml_document((b' ', 2), |w| {
        w.create_element("testsuites")
            .with_attribute(("name", name.as_str()))
            .with_attribute(("tests", r.summary.total.to_string().as_str()))
            .with_attribute(("failures", r.summary.fail.to_string().as_str()))
            .with_attribute(("errors", r.summary.error.to_string().as_str()))
            .with_attribute(("time", secs.as_str()))
            .write_inner_content(|w| {
                for (stage, controls) in &by_stage {
                    w.create_element("testsuite")
                        .with_attribute(("name", *stage))
                        .with_attribute(("tests", controls.len().to_string().as_str()))
                        .with_attribute((
                            "failures",
                            count(controls, Status::Fail).to_string().as_str(),
                        ))
                        .with_attribute((
                            "errors",
                            count(controls, Status::Error).to_string().as_str(),
                        ))
                        .with_attribute((
                            "skipped",
                            count(controls, Status::NotApplicable).to_string().as_str(),
                        ))
                        .with_attribute(("timestamp", r.started.as_str()))
                        .with_attribute(("hostname", r.context.pretty_name.as_str()))
                        .write_inner_content(|w| {
                            for c in controls {
                                testcase(w, c, stage)?;
                            }
                            Ok(())
                        })?;
                }
                Ok(())
            })?;
        Ok(())
    })
}

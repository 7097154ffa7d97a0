//! The scan as SARIF 2.1.0 for code-scanning dashboards: one rule per
//! control (its title, check, references and severity), one result per
//! control that fails or could not be evaluated (waived ones as `note`,
//! with the waiver). Built with serde_json.

use super::Report;
use super::outcome::Status;
use serde_json::{Value, json};

/// GitHub's `security-severity` scale for the catalog's severities.
fn security_severity(s: crate::stage::Severity) -> &'static str {
    match s {
        crate::stage::Severity::High => "8.0",
        crate::stage::Severity::Medium => "5.0",
        crate::stage::Severity::Low => "2.0",
    }
}

pub fn render(r: &Report) -> String {
    let rules: Vec<Value> = r
        .results
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "name": c.id,
                "shortDescription": { "text": c.title },
                "fullDescription": { "text": format!("{} ({})", c.title, c.check) },
                "help": { "text": format!("check: {}\nreferences: {}", c.check, super::report::refs_text(c)) },
                "properties": {
                    "tags": ["security", "compliance", c.stage],
                    "security-severity": security_severity(c.severity),
                },
            })
        })
        .collect();
    let results: Vec<Value> = r
        .results
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.status, Status::Fail | Status::Error | Status::Waived))
        .map(|(i, c)| {
            let level = match c.status {
                Status::Waived => "note",
                Status::Error => "warning",
                _ => "error",
            };
            json!({
                "ruleId": c.id,
                "ruleIndex": i,
                "level": level,
                "kind": "fail",
                "message": { "text": format!("{}: {}", c.title, c.evidence.join("; ")) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": format!("{}/{}", r.target.kind, c.stage) }
                    }
                }],
            })
        })
        .collect();
    let doc = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "stemforge",
                "version": r.version,
                "rules": rules,
            }},
            "results": results,
            "properties": {
                "target": r.target.path,
                "os": r.context.pretty_name,
            },
        }],
    });
    serde_json::to_string_pretty(&doc).expect("a SARIF document serializes") + "\n"
}

//! Rendering a scan report: a text table for people, JSON for machines.

use super::Report;
use super::outcome::Status;

/// The report as text. `verbose` prints the evidence of passing controls
/// too; failures and errors always carry theirs.
pub fn render_text(r: &Report, verbose: bool) -> String {
    let mut out = String::new();
    let roles = if r.context.roles.is_empty() {
        "none".to_string()
    } else {
        r.context.roles.join(", ")
    };
    let os = if r.context.pretty_name.is_empty() {
        "unknown OS".to_string()
    } else {
        r.context.pretty_name.clone()
    };
    let target = if r.target.kind == "live" {
        "the live host".to_string()
    } else {
        format!("root tree {}", r.target.path)
    };
    out.push_str(&format!(
        "stemforge scan of {target} ({os}; roles: {roles})\n\n"
    ));
    let width = r.results.iter().map(|c| c.id.len()).max().unwrap_or(10);
    for c in &r.results {
        let tag = match c.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotApplicable => "N/A ",
            Status::Error => "ERR ",
        };
        out.push_str(&format!(
            "{tag}  {:<width$}  {:<6}  {}\n",
            c.id,
            c.severity.as_str(),
            c.title
        ));
        let show = matches!(c.status, Status::Fail | Status::Error) || verbose;
        if show {
            for e in &c.evidence {
                out.push_str(&format!("      {e}\n"));
            }
        }
    }
    let s = &r.summary;
    out.push_str(&format!(
        "\n{} controls: {} pass, {} fail, {} not applicable, {} error ({} ms)\n",
        s.total, s.pass, s.fail, s.not_applicable, s.error, r.duration_ms
    ));
    out
}

/// The report as pretty JSON, ending in a newline.
pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("a report serializes") + "\n"
}

/// The current UTC time as RFC 3339 (`2026-11-22T06:30:00Z`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let now = now_rfc3339();
        let re = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$").unwrap();
        assert!(re.is_match(&now), "{now}");
    }
}

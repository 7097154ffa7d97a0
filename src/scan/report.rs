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
    let target = match r.target.kind.as_str() {
        "live" => "the live host".to_string(),
        "image" => format!("disk image {}", r.target.path),
        _ => format!("root tree {}", r.target.path),
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
            Status::Waived => "WAIV",
            Status::Error => "ERR ",
        };
        out.push_str(&format!(
            "{tag}  {:<width$}  {:<6}  {}\n",
            c.id,
            c.severity.as_str(),
            c.title
        ));
        let show = matches!(c.status, Status::Fail | Status::Error | Status::Waived) || verbose;
        if show {
            for e in &c.evidence {
                out.push_str(&format!("      {e}\n"));
            }
        }
    }
    let s = &r.summary;
    out.push_str(&format!(
        "\n{} controls: {} pass, {} fail, {} not applicable, {} error, {} waived ({} ms)\n",
        s.total, s.pass, s.fail, s.not_applicable, s.error, s.waived, r.duration_ms
    ));
    out
}

/// The report as pretty JSON, ending in a newline.
pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("a report serializes") + "\n"
}

/// An XML document written by quick-xml: the declaration, then what
/// `body` writes (indented by `indent`), ending in a newline.
pub fn xml_document(
    indent: (u8, usize),
    body: impl FnOnce(&mut quick_xml::Writer<Vec<u8>>) -> std::io::Result<()>,
) -> String {
    use quick_xml::events::{BytesDecl, Event};
    let mut w = quick_xml::Writer::new_with_indent(Vec::new(), indent.0, indent.1);
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .and_then(|_| body(&mut w))
        .expect("writing XML to memory cannot fail");
    String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8") + "\n"
}

/// A control's references in one line: STIG rules, CIS
/// recommendations, FAQ items.
pub fn refs_text(c: &super::ControlResult) -> String {
    c.refs
        .stig
        .iter()
        .map(|r| {
            format!(
                "{} {} ({} {}, {})",
                r.id, r.version, r.benchmark, r.release, r.severity
            )
        })
        .chain(
            c.refs
                .cis
                .iter()
                .map(|r| format!("CIS {} {}", r.benchmark, r.id)),
        )
        .chain(c.refs.faq.iter().map(|f| format!("stemcell FAQ {f}")))
        .collect::<Vec<_>>()
        .join("; ")
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

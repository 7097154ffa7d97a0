//! Rendering a scan report: a text table for people, JSON for machines.

use super::Report;
use super::outcome::Status;
use std::time::{SystemTime, UNIX_EPOCH};

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

pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("a report serializes")
}

/// The current UTC time as RFC 3339 (`2026-11-22T06:30:00Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_329_000), "2026-11-22T06:30:00Z");
    }
}

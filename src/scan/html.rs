//! The scan as one self-contained HTML page for a person to read: the
//! target, a summary with pass, fail, waived and not-applicable bars per
//! area (stage) and per benchmark, filters by status and free text, and
//! each control with its evidence, references, waiver and fix. No
//! external asset: the style and the filter script are inline.
//!
//! Every element, attribute and text is written by quick-xml's writer
//! (escaped, in HTML's XML syntax); only the page's own fixed style and
//! script go in as they are, and they contain no character that would
//! need escaping.

use super::outcome::Status;
use super::{ControlResult, Report};
use quick_xml::Writer;
use quick_xml::events::{BytesText, Event};
use std::collections::BTreeMap;

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9 }
header { background: #1d2330; color: #fff; padding: 18px 28px }
header h1 { margin: 0 0 4px; font-size: 20px }
main { padding: 20px 28px; max-width: 1200px }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 14px 18px; margin-bottom: 18px }
h2 { font-size: 16px; margin: 0 0 10px }
.totals span { display: inline-block; margin-right: 18px; font-weight: 600 }
.row { display: flex; align-items: center; margin: 3px 0 }
.row .name { width: 320px; font-size: 13px }
.bar { flex: 1; display: flex; height: 14px; border-radius: 3px; overflow: hidden; background: #eef0f3 }
.bar i { display: block; height: 100% }
.pass { background: #2e9d5b } .fail { background: #d64545 } .error { background: #8a4fd6 }
.waived { background: #e0a030 } .not_applicable { background: #b8bec8 }
.badge { display: inline-block; min-width: 52px; text-align: center; color: #fff; border-radius: 3px; padding: 1px 6px; font-size: 12px; font-weight: 600 }
.filters label { margin-right: 14px }
#q { padding: 4px 8px; width: 260px; margin-left: 10px }
.control { border-top: 1px solid #eef0f3; padding: 8px 0 }
.control summary { cursor: pointer }
.control .id { font-family: ui-monospace, monospace; margin: 0 8px }
.evidence { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; background: #f6f7f9; padding: 6px 8px; margin: 6px 0 }
.meta { font-size: 12px; color: #525a68 }
.waiver { border-left: 3px solid #e0a030; padding-left: 8px; margin: 6px 0; font-size: 13px }
"#;

// No less-than, greater-than or ampersand: the script is written as is.
const SCRIPT: &str = r#"
(function () {
  var boxes = document.querySelectorAll('input[data-filter]');
  var query = document.getElementById('q');
  function apply() {
    var shown = {};
    boxes.forEach(function (b) { shown[b.value] = b.checked; });
    var q = query.value.toLowerCase();
    var visible = 0;
    document.querySelectorAll('.control').forEach(function (el) {
      var ok = shown[el.dataset.status] === true;
      if (ok) { ok = el.textContent.toLowerCase().indexOf(q) !== -1; }
      el.hidden = !ok;
      if (ok) { visible += 1; }
    });
    document.getElementById('shown').textContent = String(visible);
  }
  boxes.forEach(function (b) { b.addEventListener('change', apply); });
  query.addEventListener('input', apply);
  apply();
  document.body.dataset.ready = 'yes';
})();
"#;

type W = Writer<Vec<u8>>;
type Res = std::io::Result<()>;

const ORDER: [Status; 5] = [
    Status::Fail,
    Status::Error,
    Status::Waived,
    Status::Pass,
    Status::NotApplicable,
];

fn label(s: Status) -> &'static str {
    match s {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Error => "error",
        Status::Waived => "waived",
        Status::NotApplicable => "n/a",
    }
}

fn text(w: &mut W, tag: &str, class: Option<&str>, body: &str) -> Res {
    let mut el = w.create_element(tag);
    if let Some(c) = class {
        el = el.with_attribute(("class", c));
    }
    el.write_text_content(BytesText::new(body))?;
    Ok(())
}

/// One bar: the counts of each status as widths.
fn bar(w: &mut W, name: &str, controls: &[&ControlResult]) -> Res {
    let total = controls.len().max(1);
    w.create_element("div")
        .with_attribute(("class", "row"))
        .write_inner_content(|w| {
            let counts: Vec<(Status, usize)> = ORDER
                .iter()
                .map(|s| (*s, controls.iter().filter(|c| c.status == *s).count()))
                .collect();
            let summary = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(s, n)| format!("{n} {}", label(*s)))
                .collect::<Vec<_>>()
                .join(", ");
            text(w, "span", Some("name"), &format!("{name} ({summary})"))?;
            w.create_element("div")
                .with_attribute(("class", "bar"))
                .with_attribute(("title", summary.as_str()))
                .write_inner_content(|w| {
                    for (s, n) in &counts {
                        if *n == 0 {
                            continue;
                        }
                        let style = format!("width: {:.2}%", *n as f64 * 100.0 / total as f64);
                        // Not `<i/>`: HTML has no self-closing non-void elements.
                        w.create_element("i")
                            .with_attribute(("class", s.as_str()))
                            .with_attribute(("style", style.as_str()))
                            .write_text_content(BytesText::new(""))?;
                    }
                    Ok(())
                })?;
            Ok(())
        })?;
    Ok(())
}

fn control(w: &mut W, c: &ControlResult) -> Res {
    w.create_element("details")
        .with_attribute(("class", "control"))
        .with_attribute(("data-status", c.status.as_str()))
        .with_attribute(("data-stage", c.stage.as_str()))
        .write_inner_content(|w| {
            w.create_element("summary").write_inner_content(|w| {
                text(
                    w,
                    "span",
                    Some(&format!("badge {}", c.status.as_str())),
                    label(c.status),
                )?;
                text(w, "span", Some("id"), &c.id)?;
                w.write_event(Event::Text(BytesText::new(&c.title)))?;
                text(
                    w,
                    "span",
                    Some("meta"),
                    &format!("  {} · {}", c.severity.as_str(), c.stage),
                )?;
                Ok(())
            })?;
            if let Some(wv) = &c.waiver {
                text(
                    w,
                    "div",
                    Some("waiver"),
                    &format!(
                        "{} waiver, approved by {}, {} {}: {}",
                        if wv.expired { "EXPIRED" } else { "Current" },
                        wv.approver,
                        if wv.expired { "expired" } else { "expires" },
                        wv.expires,
                        wv.reason
                    ),
                )?;
            }
            text(w, "div", Some("evidence"), &c.evidence.join("\n"))?;
            text(w, "div", Some("meta"), &format!("check: {}", c.check))?;
            let refs = super::report::refs_text(c);
            if !refs.is_empty() {
                text(w, "div", Some("meta"), &format!("references: {refs}"))?;
            }
            Ok(())
        })?;
    Ok(())
}

/// The report as one HTML page.
pub fn render(r: &Report) -> String {
    let mut by_stage: BTreeMap<&str, Vec<&ControlResult>> = BTreeMap::new();
    let mut by_benchmark: BTreeMap<String, Vec<&ControlResult>> = BTreeMap::new();
    for c in &r.results {
        by_stage.entry(c.stage.as_str()).or_default().push(c);
        let mut names: Vec<String> = c
            .refs
            .stig
            .iter()
            .map(|s| format!("STIG {} {}", s.benchmark, s.release))
            .chain(c.refs.cis.iter().map(|s| format!("CIS {}", s.benchmark)))
            .collect();
        if !c.refs.faq.is_empty() {
            names.push("stemcell hardening FAQ".into());
        }
        names.sort();
        names.dedup();
        for n in names {
            by_benchmark.entry(n).or_default().push(c);
        }
    }
    let title = format!("stemforge scan: {} {}", r.target.kind, r.target.path);
    let mut w = Writer::new(Vec::new());
    let written: Res = (|| {
        w.write_event(Event::DocType(BytesText::from_escaped("html")))?;
        w.create_element("html")
            .with_attribute(("lang", "en"))
            .write_inner_content(|w| {
                w.create_element("head").write_inner_content(|w| {
                    w.create_element("meta")
                        .with_attribute(("charset", "utf-8"))
                        .write_empty()?;
                    text(w, "title", None, &title)?;
                    w.create_element("style")
                        .write_text_content(BytesText::from_escaped(STYLE))?;
                    Ok(())
                })?;
                w.create_element("body").write_inner_content(|w| {
                    w.create_element("header").write_inner_content(|w| {
                        text(w, "h1", None, &title)?;
                        let roles = if r.context.roles.is_empty() {
                            "none".to_string()
                        } else {
                            r.context.roles.join(", ")
                        };
                        text(
                            w,
                            "div",
                            None,
                            &format!(
                                "{} · roles: {} · stemforge {} · {} · {} ms",
                                r.context.pretty_name, roles, r.version, r.started, r.duration_ms
                            ),
                        )
                    })?;
                    w.create_element("main").write_inner_content(|w| {
                        w.create_element("section").write_inner_content(|w| {
                            text(w, "h2", None, "Summary")?;
                            let s = &r.summary;
                            w.create_element("div")
                                .with_attribute(("class", "totals"))
                                .write_inner_content(|w| {
                                    for (n, what) in [
                                        (s.total, "controls"),
                                        (s.pass, "pass"),
                                        (s.fail, "fail"),
                                        (s.error, "error"),
                                        (s.waived, "waived"),
                                        (s.not_applicable, "not applicable"),
                                    ] {
                                        text(w, "span", None, &format!("{n} {what}"))?;
                                    }
                                    Ok(())
                                })?;
                            let all: Vec<&ControlResult> = r.results.iter().collect();
                            bar(w, "all controls", &all)
                        })?;
                        w.create_element("section").write_inner_content(|w| {
                            text(w, "h2", None, "By area")?;
                            for (stage, cs) in &by_stage {
                                bar(w, stage, cs)?;
                            }
                            Ok(())
                        })?;
                        w.create_element("section").write_inner_content(|w| {
                            text(w, "h2", None, "By benchmark")?;
                            for (b, cs) in &by_benchmark {
                                bar(w, b, cs)?;
                            }
                            Ok(())
                        })?;
                        w.create_element("section").write_inner_content(|w| {
                            text(w, "h2", None, "Controls")?;
                            w.create_element("div")
                                .with_attribute(("class", "filters"))
                                .write_inner_content(|w| {
                                    for s in ORDER {
                                        w.create_element("label").write_inner_content(|w| {
                                            let mut input = w
                                                .create_element("input")
                                                .with_attribute(("type", "checkbox"))
                                                .with_attribute(("data-filter", "status"))
                                                .with_attribute(("value", s.as_str()));
                                            if s != Status::NotApplicable {
                                                input =
                                                    input.with_attribute(("checked", "checked"));
                                            }
                                            input.write_empty()?;
                                            w.write_event(Event::Text(BytesText::new(&format!(
                                                " {}",
                                                label(s)
                                            ))))?;
                                            Ok(())
                                        })?;
                                    }
                                    w.create_element("input")
                                        .with_attribute(("id", "q"))
                                        .with_attribute(("type", "search"))
                                        .with_attribute((
                                            "placeholder",
                                            "filter by id, title, evidence",
                                        ))
                                        .write_empty()?;
                                    w.write_event(Event::Text(BytesText::new(" shown: ")))?;
                                    w.create_element("span")
                                        .with_attribute(("id", "shown"))
                                        .write_text_content(BytesText::new("0"))?;
                                    Ok(())
                                })?;
                            for c in &r.results {
                                control(w, c)?;
                            }
                            Ok(())
                        })?;
                        Ok(())
                    })?;
                    w.create_element("script")
                        .write_text_content(BytesText::from_escaped(SCRIPT))?;
                    Ok(())
                })?;
                Ok(())
            })?;
        Ok(())
    })();
    written.expect("writing HTML to memory cannot fail");
    String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8") + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_inline_script_and_style_need_no_escaping() {
        for s in [super::SCRIPT, super::STYLE] {
            assert!(!s.contains(['<', '>', '&']), "{s}");
        }
    }
}

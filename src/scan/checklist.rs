//! The scan as STIG checklists, for accreditation teams: STIG Viewer 2's
//! CKL (XML, checked against DISA's schema) and STIG Viewer 3's CKLB
//! (JSON, the layout STIG Manager imports). One checklist per STIG the
//! scanned controls answer (the Ubuntu STIGs for the OS, the Docker,
//! PostgreSQL, Kubernetes and MKE STIGs for roles), with every rule of
//! that STIG: its status decided by the controls that cite it (one
//! failing is Open; all passing is NotAFinding; none applying is
//! Not_Applicable), a written reason from the coverage tables where no
//! control covers it (Not_Applicable), or Not_Reviewed.

use super::outcome::Status;
use super::{ControlResult, Report};
use crate::benchmarks::{self, StigRef};
use quick_xml::Writer;
use quick_xml::events::BytesText;
use serde::Serialize;

/// A rule's status as STIG Viewer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    NotAFinding,
    Open,
    NotApplicable,
    NotReviewed,
}

impl Verdict {
    pub fn ckl(self) -> &'static str {
        match self {
            Verdict::NotAFinding => "NotAFinding",
            Verdict::Open => "Open",
            Verdict::NotApplicable => "Not_Applicable",
            Verdict::NotReviewed => "Not_Reviewed",
        }
    }
    pub fn cklb(self) -> &'static str {
        match self {
            Verdict::NotAFinding => "not_a_finding",
            Verdict::Open => "open",
            Verdict::NotApplicable => "not_applicable",
            Verdict::NotReviewed => "not_reviewed",
        }
    }
}

/// One rule of a checklist.
pub struct Rule<'a> {
    pub stig: &'a StigRef,
    pub title: &'a str,
    pub verdict: Verdict,
    /// The evidence of every control that decided it.
    pub details: String,
    pub comments: String,
}

/// One STIG's checklist.
pub struct Stig<'a> {
    pub benchmark: String,
    pub release: &'a str,
    pub rules: Vec<Rule<'a>>,
}

impl Stig<'_> {
    pub fn title(&self) -> String {
        let name = match self.benchmark.as_str() {
            "ubuntu2204" => "Canonical Ubuntu 22.04 LTS",
            "ubuntu2404" => "Canonical Ubuntu 24.04 LTS",
            "docker-enterprise-2.x" => "Docker Enterprise 2.x Linux/UNIX",
            "postgresql-9.x" => "PostgreSQL 9.x",
            "kubernetes" => "Kubernetes",
            "mirantis-mke" => "Mirantis Kubernetes Engine",
            other => other,
        };
        format!("{name} Security Technical Implementation Guide")
    }

    /// `V2R8` -> ("2", "Release: 8 Benchmark Date: 01 Apr 2026"), as
    /// STIG Viewer writes it (the date where the benchmark table has it).
    fn version_release(&self) -> (String, String) {
        let date = match self.benchmark.as_str() {
            "ubuntu2204" => " Benchmark Date: 01 Apr 2026",
            "ubuntu2404" => " Benchmark Date: 01 Jul 2026",
            "docker-enterprise-2.x" | "postgresql-9.x" => " Benchmark Date: 24 Jul 2024",
            "mirantis-mke" => " Benchmark Date: 24 Jul 2024",
            _ => "",
        };
        let r = self.release.trim_start_matches('V');
        match r.split_once('R') {
            Some((v, rel)) => (v.to_string(), format!("Release: {rel}{date}")),
            None => (r.to_string(), String::new()),
        }
    }

    fn uuid(&self) -> String {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("stemforge:stig:{}:{}", self.benchmark, self.release).as_bytes(),
        )
        .to_string()
    }
}

/// The checklists of a report: every STIG one of its applicable
/// controls cites.
pub fn build(r: &Report) -> Vec<Stig<'static>> {
    let b = benchmarks::get();
    let mut cited: Vec<&str> = Vec::new();
    for c in r
        .results
        .iter()
        .filter(|c| c.status != Status::NotApplicable)
    {
        for s in &c.refs.stig {
            if !cited.contains(&s.benchmark.as_str()) {
                cited.push(s.benchmark.as_str());
            }
        }
    }
    let mut out = Vec::new();
    for bench in cited {
        let Some((release, source, rules)) = b.stig_rules(bench) else {
            continue;
        };
        let rules = rules
            .into_iter()
            .map(|(stig, item)| {
                let controls: Vec<&ControlResult> = r
                    .results
                    .iter()
                    .filter(|c| c.refs.stig.iter().any(|s| s.version == stig.version))
                    .collect();
                rule(stig, &item.title, &controls, b.reason(source, &item.id))
            })
            .collect();
        out.push(Stig {
            benchmark: bench.to_string(),
            release,
            rules,
        });
    }
    out
}

fn rule<'a>(
    stig: &'a StigRef,
    title: &'a str,
    controls: &[&ControlResult],
    reason: Option<&str>,
) -> Rule<'a> {
    let applied: Vec<&&ControlResult> = controls
        .iter()
        .filter(|c| c.status != Status::NotApplicable)
        .collect();
    let verdict = if controls.is_empty() {
        if reason.is_some() {
            Verdict::NotApplicable
        } else {
            Verdict::NotReviewed
        }
    } else if applied
        .iter()
        .any(|c| matches!(c.status, Status::Fail | Status::Waived))
    {
        // A waiver accepts the risk of an open finding; it stays Open,
        // with the waiver in the comments.
        Verdict::Open
    } else if applied.iter().any(|c| c.status == Status::Error) {
        Verdict::NotReviewed
    } else if applied.is_empty() {
        Verdict::NotApplicable
    } else {
        Verdict::NotAFinding
    };
    let mut details = String::new();
    for c in controls {
        details.push_str(&format!(
            "stemforge control {}: {}\n",
            c.id,
            c.status.as_str()
        ));
        for e in &c.evidence {
            details.push_str(&format!("  {e}\n"));
        }
    }
    let waivers: Vec<String> = controls
        .iter()
        .filter_map(|c| {
            c.waiver.as_ref().map(|w| {
                format!(
                    "{} waiver for {}: {} (approved by {}, {} {})",
                    if w.expired { "EXPIRED" } else { "Current" },
                    c.id,
                    w.reason,
                    w.approver,
                    if w.expired { "expired" } else { "expires" },
                    w.expires
                )
            })
        })
        .collect();
    let comments = match (controls.is_empty(), reason) {
        (true, Some(why)) => format!("Not covered by an image control: {why}"),
        (true, None) => "No stemforge control checks this rule; review it by hand.".to_string(),
        (false, _) => format!(
            "Checked automatically by stemforge ({}).",
            controls
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let comments = if waivers.is_empty() {
        comments
    } else {
        format!("{comments}\n{}", waivers.join("\n"))
    };
    Rule {
        stig,
        title,
        verdict,
        details: details.trim_end().to_string(),
        comments,
    }
}

/// The name of the scanned asset: the image file's or the tree's name,
/// or the live host's; never empty (STIG Manager refuses an empty one).
fn host_name(r: &Report) -> String {
    let name = match r.target.kind.as_str() {
        "live" => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        _ => std::path::Path::new(&r.target.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if name.is_empty() {
        "stemforge-target".to_string()
    } else {
        name
    }
}

fn target_comment(r: &Report) -> String {
    format!(
        "stemforge {} scan of {} {} ({}), {}",
        r.version, r.target.kind, r.target.path, r.context.pretty_name, r.started
    )
}

type W = Writer<Vec<u8>>;
type Res = std::io::Result<()>;

fn text_el(w: &mut W, name: &str, text: &str) -> Res {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

fn stig_data(w: &mut W, attr: &str, data: &str) -> Res {
    w.create_element("STIG_DATA").write_inner_content(|w| {
        text_el(w, "VULN_ATTRIBUTE", attr)?;
        text_el(w, "ATTRIBUTE_DATA", data)
    })?;
    Ok(())
}

/// The checklists as one STIG Viewer 2 CKL document.
pub fn render_ckl(r: &Report) -> String {
    let stigs = build(r);
    let host = host_name(r);
    super::report::xml_document((b'\t', 1), |w| {
        w.create_element("CHECKLIST").write_inner_content(|w| {
            w.create_element("ASSET").write_inner_content(|w| {
                text_el(w, "ROLE", "None")?;
                text_el(w, "ASSET_TYPE", "Computing")?;
                text_el(w, "HOST_NAME", &host)?;
                text_el(w, "HOST_IP", "")?;
                text_el(w, "HOST_MAC", "")?;
                text_el(w, "HOST_FQDN", "")?;
                text_el(w, "TARGET_COMMENT", &target_comment(r))?;
                text_el(w, "TECH_AREA", "UNIX OS")?;
                text_el(w, "TARGET_KEY", "")?;
                text_el(w, "WEB_OR_DATABASE", "false")?;
                text_el(w, "WEB_DB_SITE", "")?;
                text_el(w, "WEB_DB_INSTANCE", "")
            })?;
            w.create_element("STIGS").write_inner_content(|w| {
                for s in &stigs {
                    let (version, release) = s.version_release();
                    w.create_element("iSTIG").write_inner_content(|w| {
                        w.create_element("STIG_INFO").write_inner_content(|w| {
                            for (k, v) in [
                                ("version", version.as_str()),
                                ("classification", "UNCLASSIFIED"),
                                ("stigid", s.benchmark.as_str()),
                                ("releaseinfo", release.as_str()),
                                ("title", s.title().as_str()),
                                ("uuid", s.uuid().as_str()),
                                ("source", "stemforge benchmarks/"),
                            ] {
                                w.create_element("SI_DATA").write_inner_content(|w| {
                                    text_el(w, "SID_NAME", k)?;
                                    text_el(w, "SID_DATA", v)
                                })?;
                            }
                            Ok(())
                        })?;
                        for rule in &s.rules {
                            w.create_element("VULN").write_inner_content(|w| {
                                stig_data(w, "Vuln_Num", &rule.stig.id)?;
                                stig_data(w, "Severity", &rule.stig.severity)?;
                                stig_data(w, "Rule_ID", &rule.stig.rule)?;
                                stig_data(w, "Rule_Ver", &rule.stig.version)?;
                                stig_data(w, "Rule_Title", rule.title)?;
                                stig_data(
                                    w,
                                    "STIGRef",
                                    &format!("{} :: Version {version}, {release}", s.title()),
                                )?;
                                text_el(w, "STATUS", rule.verdict.ckl())?;
                                text_el(w, "FINDING_DETAILS", &rule.details)?;
                                text_el(w, "COMMENTS", &rule.comments)?;
                                text_el(w, "SEVERITY_OVERRIDE", "")?;
                                text_el(w, "SEVERITY_JUSTIFICATION", "")
                            })?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
            Ok(())
        })?;
        Ok(())
    })
}

#[derive(Serialize)]
struct Cklb {
    title: String,
    id: String,
    active: bool,
    mode: u8,
    has_path: bool,
    target_data: TargetData,
    stigs: Vec<CklbStig>,
    cklb_version: &'static str,
}

#[derive(Serialize)]
struct TargetData {
    target_type: &'static str,
    host_name: String,
    ip_address: &'static str,
    mac_address: &'static str,
    fqdn: &'static str,
    comments: String,
    role: &'static str,
    is_web_database: bool,
    technology_area: &'static str,
    web_db_site: &'static str,
    web_db_instance: &'static str,
}

#[derive(Serialize)]
struct CklbStig {
    stig_name: String,
    display_name: String,
    stig_id: String,
    release_info: String,
    version: String,
    uuid: String,
    reference_identifier: String,
    size: usize,
    rules: Vec<CklbRule>,
}

#[derive(Serialize)]
struct CklbRule {
    uuid: String,
    stig_uuid: String,
    group_id: String,
    group_id_src: String,
    rule_id: String,
    rule_id_src: String,
    rule_version: String,
    rule_title: String,
    group_title: String,
    severity: String,
    weight: &'static str,
    classification: &'static str,
    status: &'static str,
    finding_details: String,
    comments: String,
    overrides: serde_json::Map<String, serde_json::Value>,
    ccis: Vec<String>,
    legacy_ids: Vec<String>,
}

/// The checklists as one STIG Viewer 3 CKLB document.
pub fn render_cklb(r: &Report) -> String {
    let stigs = build(r);
    let doc = Cklb {
        title: format!("stemforge {}", host_name(r)),
        id: uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("stemforge:checklist:{}:{}", r.target.path, r.started).as_bytes(),
        )
        .to_string(),
        active: false,
        mode: 1,
        has_path: true,
        target_data: TargetData {
            target_type: "Computing",
            host_name: host_name(r),
            ip_address: "",
            mac_address: "",
            fqdn: "",
            comments: target_comment(r),
            role: "None",
            is_web_database: false,
            technology_area: "UNIX OS",
            web_db_site: "",
            web_db_instance: "",
        },
        stigs: stigs
            .iter()
            .map(|s| {
                let (version, release) = s.version_release();
                let stig_uuid = s.uuid();
                CklbStig {
                    stig_name: s.title(),
                    display_name: s.title(),
                    stig_id: s.benchmark.to_string(),
                    release_info: release,
                    version,
                    uuid: stig_uuid.clone(),
                    // STIG Viewer writes DISA's numeric id; STIG Manager "0000".
                    reference_identifier: "0000".to_string(),
                    size: s.rules.len(),
                    rules: s
                        .rules
                        .iter()
                        .map(|rule| CklbRule {
                            uuid: uuid::Uuid::new_v5(
                                &uuid::Uuid::NAMESPACE_URL,
                                format!("stemforge:rule:{}", rule.stig.rule).as_bytes(),
                            )
                            .to_string(),
                            stig_uuid: stig_uuid.clone(),
                            group_id: rule.stig.id.clone(),
                            group_id_src: rule.stig.id.clone(),
                            rule_id: rule.stig.rule.trim_end_matches("_rule").to_string(),
                            rule_id_src: rule.stig.rule.clone(),
                            rule_version: rule.stig.version.clone(),
                            rule_title: rule.title.to_string(),
                            group_title: rule.title.to_string(),
                            severity: rule.stig.severity.clone(),
                            weight: "10.0",
                            classification: "UNCLASSIFIED",
                            status: rule.verdict.cklb(),
                            finding_details: rule.details.clone(),
                            comments: rule.comments.clone(),
                            overrides: serde_json::Map::new(),
                            ccis: Vec::new(),
                            legacy_ids: Vec::new(),
                        })
                        .collect(),
                }
            })
            .collect(),
        cklb_version: "1.0",
    };
    serde_json::to_string_pretty(&doc).expect("a checklist serializes") + "\n"
}

//! The compliance scanner: evaluates the catalog's controls against a
//! target (a root tree or the live host) and writes the report that CI
//! systems and accreditation teams read.

pub mod breaks;
pub mod check;
pub mod checklist;
pub mod diff;
pub mod expect;
pub mod html;
pub mod image;
pub mod junit;
pub mod keypath;
pub mod kinds;
pub mod outcome;
pub mod qcow2;
pub mod report;
pub mod sarif;
pub mod target;
pub mod users;
pub mod view;
pub mod waiver;

use crate::stage::{Catalog, Refs, Severity};
use outcome::{Outcome, Status};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use target::Target;

/// Where the build records what it made; the scanner reads the roles
/// from it so role controls apply to role images.
pub const IMAGE_INFO: &str = "/etc/stemforge/image.json";

/// What the image is, as the build recorded it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub profile: String,
    pub distro: String,
    pub codename: String,
    pub version: String,
    pub roles: Vec<String>,
    pub stages: Vec<String>,
    pub stemforge_version: String,
    pub built: String,
}

/// The facts that decide which controls apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ScanContext {
    pub distro: String,
    pub codename: String,
    pub version: String,
    pub pretty_name: String,
    pub roles: Vec<String>,
    /// Where the roles came from: the image record, the command line, or none.
    pub roles_from: String,
    /// The profile the image was built from (its record), if known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub profile: String,
}

impl ScanContext {
    /// Read /etc/os-release and the image record of the target. `roles`
    /// from the command line take precedence over the record.
    pub fn detect(t: &Target, roles: Option<Vec<String>>) -> ScanContext {
        let os = t
            .read_optional("/etc/os-release")
            .ok()
            .flatten()
            .or_else(|| t.read_optional("/usr/lib/os-release").ok().flatten())
            .unwrap_or_default();
        let get = |k: &str| {
            os.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        let info: Option<ImageInfo> = t
            .read_optional(IMAGE_INFO)
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str(&s).ok());
        let (roles, roles_from) = match (roles, &info) {
            (Some(r), _) => (r, "command line".to_string()),
            (None, Some(i)) => (i.roles.clone(), IMAGE_INFO.to_string()),
            (None, None) => (Vec::new(), "none".to_string()),
        };
        ScanContext {
            distro: get("ID"),
            codename: get("VERSION_CODENAME"),
            version: get("VERSION_ID"),
            pretty_name: get("PRETTY_NAME"),
            roles,
            roles_from,
            profile: info.map(|i| i.profile).unwrap_or_default(),
        }
    }
}

/// One control's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ControlResult {
    pub id: String,
    pub title: String,
    pub severity: Severity,
    pub stage: String,
    pub refs: Refs,
    pub check: String,
    pub status: Status,
    pub evidence: Vec<String>,
    /// The waiver that applies to it, current or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiver: Option<waiver::Applied>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Summary {
    pub total: usize,
    pub pass: usize,
    pub fail: usize,
    pub not_applicable: usize,
    pub error: usize,
    #[serde(default)]
    pub waived: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TargetInfo {
    /// `root` or `live`.
    pub kind: String,
    pub path: String,
}

/// The scan report (`--format json` prints exactly this).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Report {
    pub scanner: String,
    pub version: String,
    pub target: TargetInfo,
    pub context: ScanContext,
    pub started: String,
    pub duration_ms: u64,
    pub summary: Summary,
    pub results: Vec<ControlResult>,
}

impl Report {
    /// Every applicable control passed.
    pub fn passed(&self) -> bool {
        self.summary.fail == 0 && self.summary.error == 0
    }

    pub fn result(&self, id: &str) -> Option<&ControlResult> {
        self.results.iter().find(|r| r.id == id)
    }

    /// The controls that failed or could not be evaluated.
    pub fn problems(&self) -> impl Iterator<Item = &ControlResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.status, Status::Fail | Status::Error))
    }
}

/// Which controls to run.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these control ids (empty: all).
    pub ids: Vec<String>,
    /// Only the controls that answer this benchmark.
    pub benchmark: Benchmark,
}

/// `scan --benchmark`: which reference a control must carry to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Benchmark {
    /// Every control.
    #[default]
    All,
    /// Controls with a DISA STIG rule.
    Stig,
    /// Controls with a CIS Level 1 Server recommendation.
    CisL1,
    /// Controls with a CIS Level 1 or Level 2 Server recommendation.
    CisL2,
    /// Controls with a stemcell hardening FAQ item.
    Faq,
}

impl Benchmark {
    pub fn selects(self, refs: &Refs) -> bool {
        match self {
            Benchmark::All => true,
            Benchmark::Stig => !refs.stig.is_empty(),
            Benchmark::CisL1 => refs.cis.iter().any(|c| c.level == 1),
            Benchmark::CisL2 => !refs.cis.is_empty(),
            Benchmark::Faq => !refs.faq.is_empty(),
        }
    }
}

/// The counts of each status.
pub fn summarize(results: &[ControlResult]) -> Summary {
    let mut summary = Summary {
        total: results.len(),
        ..Default::default()
    };
    for r in results {
        match r.status {
            Status::Pass => summary.pass += 1,
            Status::Fail => summary.fail += 1,
            Status::NotApplicable => summary.not_applicable += 1,
            Status::Error => summary.error += 1,
            Status::Waived => summary.waived += 1,
        }
    }
    summary
}

/// Evaluate the catalog against `target`.
pub fn run(catalog: &Catalog, target: &Target, ctx: &ScanContext, sel: &Selection) -> Report {
    let t0 = Instant::now();
    // Each file read, command run and fact parsed once for the whole scan.
    let target = &target.scanning();
    let started = report::now_rfc3339();
    let mut results = Vec::new();
    for (stage, control) in catalog.controls() {
        if !sel.ids.is_empty() && !sel.ids.contains(&control.id) {
            continue;
        }
        if !sel.benchmark.selects(&control.refs) {
            continue;
        }
        let outcome = match catalog.control_applies(stage, control, ctx, target) {
            Err(why) => Outcome::na(why),
            Ok(()) => control.check.eval(target),
        };
        results.push(ControlResult {
            id: control.id.clone(),
            title: control.title.clone(),
            severity: control.severity,
            stage: stage.name.clone(),
            refs: control.refs.clone(),
            check: control.check.describe(),
            status: outcome.status,
            evidence: outcome.evidence,
            waiver: None,
        });
    }
    let summary = summarize(&results);
    Report {
        scanner: "stemforge".into(),
        version: crate::VERSION.into(),
        target: TargetInfo {
            kind: target.kind().into(),
            path: target.root_dir().display().to_string(),
        },
        context: ctx.clone(),
        started,
        duration_ms: t0.elapsed().as_millis() as u64,
        summary,
        results,
    }
}

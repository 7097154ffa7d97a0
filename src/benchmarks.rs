//! The reference documents the catalog answers to: the stemcell hardening
//! FAQ (section 4), the DISA STIGs for Ubuntu 22.04 (V2R8) and 24.04
//! (V1R6), the CIS Ubuntu benchmarks (22.04 v2.0.0, 24.04 v1.0.0), and
//! for the roles the Docker Enterprise 2.x STIG (V2R2) with CIS Docker
//! v1.6.0, the PostgreSQL 9.x STIG (V2R5), the Kubernetes STIG (V1R11)
//! and the Mirantis Kubernetes Engine STIG (V2R1).
//! Their identifiers live in `benchmarks/*.tsv` (provenance in
//! `benchmarks/README.md`) and are compiled in: a control's reference is
//! checked against them when the catalog loads, so no identifier can be
//! made up, and a short reference (`UBTU-22-255040`) expands to the
//! structured one reports carry (V- and SV- ids, benchmark, release).
//! Items a control does not cover carry their reason in
//! `benchmarks/coverage/SOURCE.yml`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// A STIG benchmark stemforge references. Its table has a header line
/// naming at least `version`, `vuln_id`, `rule_id`, `severity` and
/// `title`; columns are found by name.
struct StigTable {
    /// `ubuntu2204`, `docker-ee-2.x`
    benchmark: &'static str,
    /// `V2R8`
    release: &'static str,
    /// `UBTU-22-`: the version prefix of its rules.
    prefix: &'static str,
    /// The coverage source its rows make.
    source: &'static str,
    /// Items are named by their V- id (the role documents do) rather
    /// than their version.
    by_vuln_id: bool,
    tsv: &'static str,
}

const STIGS: &[StigTable] = &[
    StigTable {
        benchmark: "ubuntu2204",
        release: "V2R8",
        prefix: "UBTU-22-",
        source: "stig-ubuntu2204",
        by_vuln_id: false,
        tsv: include_str!("../benchmarks/stig-ubuntu2204-v2r8.tsv"),
    },
    StigTable {
        benchmark: "ubuntu2404",
        release: "V1R6",
        prefix: "UBTU-24-",
        source: "stig-ubuntu2404",
        by_vuln_id: false,
        tsv: include_str!("../benchmarks/stig-ubuntu2404-v1r6.tsv"),
    },
    StigTable {
        benchmark: "docker-enterprise-2.x",
        release: "V2R2",
        prefix: "DKER-EE-",
        source: "docker",
        by_vuln_id: true,
        tsv: include_str!("../benchmarks/docker.tsv"),
    },
    StigTable {
        benchmark: "postgresql-9.x",
        release: "V2R5",
        prefix: "PGS9-00-",
        source: "postgres",
        by_vuln_id: true,
        tsv: include_str!("../benchmarks/postgres.tsv"),
    },
    StigTable {
        benchmark: "kubernetes",
        release: "V1R11",
        prefix: "CNTR-K8-",
        source: "kubernetes",
        by_vuln_id: true,
        tsv: include_str!("../benchmarks/kubernetes.tsv"),
    },
    StigTable {
        benchmark: "mirantis-mke",
        release: "V2R1",
        prefix: "CNTR-MK-",
        source: "mke",
        by_vuln_id: true,
        tsv: include_str!("../benchmarks/mke.tsv"),
    },
];

/// The CIS Docker Benchmark the docker table maps to, as references
/// name it (`docker-v1.6.0:2.2`).
pub const CIS_DOCKER: &str = "docker-v1.6.0";

const CIS_TSV: &str = include_str!("../benchmarks/cis-ubuntu.tsv");
const FAQ_TSV: &str = include_str!("../benchmarks/faq.tsv");

/// The coverage reasons, by source name.
const COVERAGE: &[(&str, &str)] = &[
    ("faq", include_str!("../benchmarks/coverage/faq.yml")),
    (
        "stig-ubuntu2204",
        include_str!("../benchmarks/coverage/stig-ubuntu2204.yml"),
    ),
    (
        "stig-ubuntu2404",
        include_str!("../benchmarks/coverage/stig-ubuntu2404.yml"),
    ),
    (
        "cis-ubuntu2204",
        include_str!("../benchmarks/coverage/cis-ubuntu2204.yml"),
    ),
    (
        "cis-ubuntu2404",
        include_str!("../benchmarks/coverage/cis-ubuntu2404.yml"),
    ),
    ("docker", include_str!("../benchmarks/coverage/docker.yml")),
    (
        "postgres",
        include_str!("../benchmarks/coverage/postgres.yml"),
    ),
    (
        "kubernetes",
        include_str!("../benchmarks/coverage/kubernetes.yml"),
    ),
    ("mke", include_str!("../benchmarks/coverage/mke.yml")),
];

/// A STIG rule as reports carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StigRef {
    /// `V-260469`
    pub id: String,
    /// `SV-260469r991589_rule`
    pub rule: String,
    /// `UBTU-22-211015`
    pub version: String,
    /// `ubuntu2204`
    pub benchmark: String,
    /// `V2R8`
    pub release: String,
    /// DISA's category as a word: high (CAT I), medium, low.
    pub severity: String,
}

/// A CIS recommendation as reports carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CisRef {
    /// `5.2.10`
    pub id: String,
    /// The Server profile level (1 or 2).
    pub level: u8,
    pub profile: String,
    /// `ubuntu2204-v2.0.0`
    pub benchmark: String,
    /// Automated (scored by a tool) or Manual.
    pub automated: bool,
}

impl CisRef {
    /// The benchmark's system (`ubuntu2204` of `ubuntu2204-v2.0.0`).
    pub fn os(&self) -> &str {
        self.benchmark.split('-').next().unwrap_or(&self.benchmark)
    }
}

/// A STIG's rules: (release, coverage source, each rule with its item).
pub type StigRules<'a> = (&'static str, &'static str, Vec<(&'a StigRef, &'a Item)>);

/// One item of a source document, for coverage tables.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub id: String,
    pub title: String,
    /// STIG severity or CIS level (`l1`, `l2`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub grade: String,
    /// The references that cover it (`stig:DKER-EE-002070`,
    /// `cis:docker-v1.6.0:2.17`, `faq:4.2.1`): a control citing any
    /// of them covers the item.
    #[serde(skip)]
    pub keys: Vec<String>,
    /// For the Kubernetes documents: whether the item concerns a worker
    /// node's own configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<bool>,
}

pub struct Benchmarks {
    stig: BTreeMap<String, StigRef>,
    cis: BTreeMap<String, CisRef>,
    /// Items by source name (`faq`, `stig-ubuntu2204`, `cis-ubuntu2404`).
    items: BTreeMap<&'static str, Vec<Item>>,
    reasons: BTreeMap<&'static str, BTreeMap<String, String>>,
}

/// The source names `coverage --source` takes.
pub const SOURCES: &[&str] = &[
    "faq",
    "stig-ubuntu2204",
    "stig-ubuntu2404",
    "cis-ubuntu2204",
    "cis-ubuntu2404",
    "docker",
    "postgres",
    "kubernetes",
    "mke",
];

fn rows(tsv: &'static str) -> impl Iterator<Item = Vec<&'static str>> {
    tsv.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').collect())
}

/// The tables, parsed once. They are part of the binary and tested
/// below, so a malformed row is a build defect, not an input error.
pub fn get() -> &'static Benchmarks {
    static B: OnceLock<Benchmarks> = OnceLock::new();
    B.get_or_init(|| {
        let mut b = Benchmarks {
            stig: BTreeMap::new(),
            cis: BTreeMap::new(),
            items: BTreeMap::new(),
            reasons: BTreeMap::new(),
        };
        for t in STIGS {
            let header: Vec<&str> = t.tsv.lines().next().unwrap_or("").split('\t').collect();
            let col = |name: &str| header.iter().position(|h| *h == name);
            let need = |name: &str| {
                col(name).unwrap_or_else(|| panic!("{}: no column `{name}`", t.benchmark))
            };
            let (version, vuln, rule, severity, title) = (
                need("version"),
                need("vuln_id"),
                need("rule_id"),
                need("severity"),
                need("title"),
            );
            let (cis_doc, cis_new, node) = (col("cis_v120"), col("cis_v160"), col("node"));
            for r in rows(t.tsv) {
                let cis_doc = cis_doc.map(|c| r[c]).filter(|c| *c != "-");
                let cis_new: Vec<&str> = cis_new
                    .map(|c| r[c])
                    .filter(|c| *c != "-")
                    .map(|c| c.split(',').collect())
                    .unwrap_or_default();
                let mut keys: Vec<String> = cis_new
                    .iter()
                    .map(|c| format!("cis:{CIS_DOCKER}:{c}"))
                    .collect();
                for c in &cis_new {
                    b.cis.entry(format!("{CIS_DOCKER}:{c}")).or_insert(CisRef {
                        id: c.to_string(),
                        // The docker table records no CIS level.
                        level: 0,
                        profile: "docker".into(),
                        benchmark: CIS_DOCKER.into(),
                        automated: true,
                    });
                }
                let id = if r[version] == "-" {
                    // A row with a CIS number only: named as the document names it.
                    format!("CIS {}", cis_doc.unwrap_or("?"))
                } else {
                    let stig = StigRef {
                        version: r[version].into(),
                        id: r[vuln].into(),
                        rule: r[rule].into(),
                        severity: r[severity].into(),
                        benchmark: t.benchmark.into(),
                        release: t.release.into(),
                    };
                    debug_assert!(stig.version.starts_with(t.prefix));
                    keys.push(format!("stig:{}", stig.version));
                    let id = if t.by_vuln_id {
                        stig.id.clone()
                    } else {
                        stig.version.clone()
                    };
                    b.stig.insert(stig.version.clone(), stig);
                    id
                };
                let items = b.items.entry(t.source).or_default();
                // The docker document lists three rows twice (table and notes).
                if items.iter().any(|i| i.id == id) {
                    continue;
                }
                items.push(Item {
                    id,
                    title: r[title].into(),
                    grade: if r[severity] == "-" {
                        String::new()
                    } else {
                        r[severity].into()
                    },
                    keys,
                    node: node.map(|c| r[c] == "yes"),
                });
            }
        }
        for r in rows(CIS_TSV) {
            let levels: Vec<&str> = r[2].split(',').collect();
            let level = if levels.contains(&"l1_server") {
                1
            } else if levels.contains(&"l2_server") {
                2
            } else {
                // Workstation-only recommendations are not for servers.
                continue;
            };
            let cis = CisRef {
                id: r[1].into(),
                level,
                profile: "server".into(),
                benchmark: r[0].into(),
                automated: r[3] == "yes",
            };
            let source = if r[0].starts_with("ubuntu2204") {
                "cis-ubuntu2204"
            } else {
                "cis-ubuntu2404"
            };
            b.items.entry(source).or_default().push(Item {
                id: cis.id.clone(),
                title: r[4].into(),
                grade: format!("l{level}"),
                keys: vec![format!("cis:{}:{}", r[0], r[1])],
                node: None,
            });
            b.cis.insert(format!("{}:{}", r[0], r[1]), cis);
        }
        for r in rows(FAQ_TSV) {
            b.items.entry("faq").or_default().push(Item {
                id: r[0].into(),
                title: r[1].into(),
                grade: String::new(),
                keys: vec![format!("faq:{}", r[0])],
                node: None,
            });
        }
        for (source, text) in COVERAGE {
            let parsed: CoverageFile = serde_yaml::from_str(text)
                .unwrap_or_else(|e| panic!("benchmarks/coverage/{source}.yml: {e}"));
            let mut reasons = parsed.reasons;
            if let Some(why) = parsed.cluster_items {
                // Items that are not a worker node's share one reason.
                for i in b.items.get(source).into_iter().flatten() {
                    if i.node == Some(false) {
                        reasons.entry(i.id.clone()).or_insert_with(|| why.clone());
                    }
                }
            }
            b.reasons.insert(source, reasons);
        }
        b
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoverageFile {
    /// Item id -> why no control covers it.
    #[serde(default)]
    reasons: BTreeMap<String, String>,
    /// The Kubernetes documents: why items that concern the cluster
    /// rather than a worker node have no control in a node image.
    #[serde(default)]
    cluster_items: Option<String>,
}

impl Benchmarks {
    /// `UBTU-22-255040` -> the structured reference.
    pub fn stig(&self, version: &str) -> Option<&StigRef> {
        self.stig.get(version)
    }

    /// `ubuntu2204-v2.0.0:5.2.10` -> the structured reference (Server
    /// profile recommendations only).
    pub fn cis(&self, key: &str) -> Option<&CisRef> {
        self.cis.get(key)
    }

    pub fn faq(&self, id: &str) -> bool {
        self.items["faq"].iter().any(|i| i.id == id)
    }

    /// The items of a source, in document order.
    pub fn items(&self, source: &str) -> Option<&[Item]> {
        self.items.get(source).map(|v| v.as_slice())
    }

    /// Why `item` of `source` has no control, when the catalog says so.
    pub fn reason(&self, source: &str, item: &str) -> Option<&str> {
        self.reasons.get(source)?.get(item).map(|s| s.as_str())
    }

    /// Every rule of a STIG benchmark (`ubuntu2204`, `docker-enterprise-2.x`)
    /// with its item (title), in document order; its release; and the
    /// coverage source that lists it.
    pub fn stig_rules(&self, benchmark: &str) -> Option<StigRules<'_>> {
        let t = STIGS.iter().find(|t| t.benchmark == benchmark)?;
        let rules = self
            .items(t.source)?
            .iter()
            .filter_map(|i| {
                let v = i.keys.iter().find_map(|k| k.strip_prefix("stig:"))?;
                Some((self.stig(v)?, i))
            })
            .collect();
        Some((t.release, t.source, rules))
    }

    pub fn reasons(&self, source: &str) -> impl Iterator<Item = (&String, &String)> {
        self.reasons.get(source).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_hold_what_their_readme_says() {
        let b = get();
        assert_eq!(b.items("faq").unwrap().len(), 104);
        assert_eq!(b.items("stig-ubuntu2204").unwrap().len(), 188);
        assert_eq!(b.items("stig-ubuntu2404").unwrap().len(), 194);
        // Server profile recommendations (workstation-only ones dropped).
        assert!(b.items("cis-ubuntu2204").unwrap().len() > 250);
        assert!(b.items("cis-ubuntu2404").unwrap().len() > 250);
        let r = b.stig("UBTU-22-211015").unwrap();
        assert_eq!(r.id, "V-260469");
        assert!(r.rule.starts_with("SV-260469r"));
        assert_eq!(
            (r.benchmark.as_str(), r.release.as_str()),
            ("ubuntu2204", "V2R8")
        );
        let c = b.cis("ubuntu2204-v2.0.0:1.1.1.1").unwrap();
        assert_eq!((c.level, c.automated), (1, true));
        assert!(b.stig("UBTU-22-999999").is_none());
        // The role documents: by V- id, three docker rows listed twice.
        assert_eq!(b.items("docker").unwrap().len(), 59);
        assert_eq!(b.items("postgres").unwrap().len(), 109);
        assert_eq!(b.items("kubernetes").unwrap().len(), 91);
        assert_eq!(b.items("mke").unwrap().len(), 44);
        let d = b.stig("DKER-EE-002070").unwrap();
        assert_eq!((d.id.as_str(), d.severity.as_str()), ("V-235812", "high"));
        assert!(b.cis("docker-v1.6.0:2.17").is_some());
        let seccomp = &b.items("docker").unwrap()[0];
        assert!(seccomp.keys.contains(&"cis:docker-v1.6.0:5.22".to_string()));
        assert!(
            b.items("docker")
                .unwrap()
                .iter()
                .any(|i| i.id == "CIS 2.10")
        );
        for (source, _) in COVERAGE {
            for (id, why) in b.reasons(source) {
                assert!(
                    b.items(source).unwrap().iter().any(|i| &i.id == id),
                    "coverage/{source}.yml: `{id}` is no item of {source}"
                );
                assert!(why.len() > 15, "coverage/{source}.yml: `{id}`: say why");
            }
        }
    }
}

//! `package`: packages that must be installed, or must not be.
//! Read from the dpkg database of the target (offline and live alike).

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::{Target, wildcard_match};
use serde::Deserialize;
use std::collections::BTreeSet;

pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageCheck {
    /// Names (or `*` patterns) that must not be installed.
    #[serde(default)]
    pub absent: Vec<String>,
    /// Names that must be installed.
    #[serde(default)]
    pub present: Vec<String>,
    /// Packages that must be installed at this Debian version or later
    /// (`openssh-server: "1:7.4"`), compared as dpkg compares them.
    #[serde(default)]
    pub min_versions: std::collections::BTreeMap<String, String>,
}

/// Names of the packages dpkg considers installed.
pub fn installed(status: &str) -> BTreeSet<String> {
    installed_versions(status).into_keys().collect()
}

/// The packages dpkg considers installed, with their versions.
pub fn installed_versions(status: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for para in status.split("\n\n") {
        let mut name = None;
        let mut version = String::new();
        let mut ok = false;
        for l in para.lines() {
            if let Some(v) = l.strip_prefix("Package: ") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = l.strip_prefix("Version: ") {
                version = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("Status: ") {
                let words: Vec<&str> = v.split_whitespace().collect();
                ok = words.last() == Some(&"installed")
                    || words.last() == Some(&"half-configured")
                    || words.last() == Some(&"unpacked");
            }
        }
        if let (Some(n), true) = (name, ok) {
            out.insert(n, version);
        }
    }
    out
}

impl PackageCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.absent.is_empty() && self.present.is_empty() && self.min_versions.is_empty() {
            return Err("list packages under `absent`, `present` or `min_versions`".into());
        }
        for (name, v) in &self.min_versions {
            v.parse::<debversion::Version>()
                .map_err(|e| format!("min_versions.{name}: `{v}` is no Debian version ({e:?})"))?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.absent.is_empty() {
            parts.push(format!("packages absent: {}", self.absent.join(", ")));
        }
        if !self.present.is_empty() {
            parts.push(format!("packages present: {}", self.present.join(", ")));
        }
        for (name, v) in &self.min_versions {
            parts.push(format!("{name} >= {v}"));
        }
        parts.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        // The dpkg database, parsed once per scan.
        let parsed = t.fact("dpkg status", || match t.read_optional(DPKG_STATUS) {
            Ok(Some(s)) => Ok(installed_versions(&s)),
            Ok(None) => Err(format!(
                "{DPKG_STATUS} does not exist (not a dpkg-based system)"
            )),
            Err(e) => Err(format!("{DPKG_STATUS}: {e}")),
        });
        let versions = match parsed.as_ref() {
            Ok(v) => v,
            Err(e) => return Outcome::error(e.clone()),
        };
        let have: BTreeSet<&String> = versions.keys().collect();
        let mut f = Findings::new();
        for pattern in &self.absent {
            let found: Vec<&String> = have
                .iter()
                .copied()
                .filter(|p| wildcard_match(pattern, p))
                .collect();
            if found.is_empty() {
                f.ok(format!("{pattern}: not installed"));
            } else {
                f.bad(format!(
                    "installed: {}",
                    found
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for name in &self.present {
            f.check(
                have.contains(name),
                if have.contains(name) {
                    format!("{name}: installed")
                } else {
                    format!("{name}: not installed")
                },
            );
        }
        for (name, min) in &self.min_versions {
            let Some(v) = versions.get(name) else {
                f.bad(format!("{name}: not installed"));
                continue;
            };
            let (Ok(have), Ok(want)) = (
                v.parse::<debversion::Version>(),
                min.parse::<debversion::Version>(),
            ) else {
                f.err(format!("{name}: version `{v}` does not parse"));
                continue;
            };
            f.check(have >= want, format!("{name} {v} (at least {min})"));
        }
        f.finish()
    }
}

crate::register_kind!("package", PackageCheck);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_from_a_real_status_excerpt() {
        let status = "Package: auditd\nStatus: install ok installed\nPriority: optional\nVersion: 1:3.0.9-1\n\n\
                      Package: telnet\nStatus: deinstall ok config-files\nVersion: 0.17+2.4-2\n\n\
                      Package: openssh-server\nStatus: install ok installed\n";
        let s = installed(status);
        assert!(s.contains("auditd"));
        assert!(s.contains("openssh-server"));
        assert!(!s.contains("telnet"), "config-files only is not installed");
        // Versions compare as dpkg compares them: epoch, upstream, revision.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("var/lib/dpkg")).unwrap();
        let check = |v: &str| {
            std::fs::write(
                d.path().join("var/lib/dpkg/status"),
                format!("Package: openssh-server\nStatus: install ok installed\nVersion: {v}\n"),
            )
            .unwrap();
            let c: PackageCheck =
                serde_yaml::from_str("min_versions: { openssh-server: \"1:7.4\" }").unwrap();
            c.validate().unwrap();
            c.eval(&Target::root(d.path()).unwrap()).status
        };
        use crate::scan::outcome::Status;
        assert_eq!(check("1:9.2p1-2+deb12u3"), Status::Pass);
        assert_eq!(check("1:7.4p1-10"), Status::Pass);
        assert_eq!(check("1:7.3p1-1"), Status::Fail);
        assert_eq!(check("9.9p1-1"), Status::Fail, "no epoch sorts before 1:");
    }

    #[test]
    fn absent_patterns_and_present_names() {
        use crate::scan::outcome::Status;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("var/lib/dpkg")).unwrap();
        std::fs::write(
            d.path().join("var/lib/dpkg/status"),
            "Package: xserver-xorg-core\nStatus: install ok installed\n\nPackage: auditd\nStatus: install ok installed\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let c = PackageCheck {
            absent: vec!["xserver-xorg*".into()],
            present: vec![],
            min_versions: Default::default(),
        };
        assert_eq!(c.eval(&t).status, Status::Fail);
        let c = PackageCheck {
            absent: vec!["nis".into()],
            present: vec!["auditd".into()],
            min_versions: Default::default(),
        };
        assert_eq!(c.eval(&t).status, Status::Pass);
        let c = PackageCheck {
            absent: vec![],
            present: vec!["openssh-server".into()],
            min_versions: Default::default(),
        };
        assert_eq!(c.eval(&t).status, Status::Fail);
    }
}

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
}

/// Names of the packages dpkg considers installed.
pub fn installed(status: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for para in status.split("\n\n") {
        let mut name = None;
        let mut ok = false;
        for l in para.lines() {
            if let Some(v) = l.strip_prefix("Package: ") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = l.strip_prefix("Status: ") {
                let words: Vec<&str> = v.split_whitespace().collect();
                ok = words.last() == Some(&"installed")
                    || words.last() == Some(&"half-configured")
                    || words.last() == Some(&"unpacked");
            }
        }
        if let (Some(n), true) = (name, ok) {
            out.insert(n);
        }
    }
    out
}

impl PackageCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.absent.is_empty() && self.present.is_empty() {
            return Err("list packages under `absent` or `present`".into());
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
        parts.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let status = match t.read_optional(DPKG_STATUS) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Outcome::error(format!(
                    "{DPKG_STATUS} does not exist (not a dpkg-based system)"
                ));
            }
            Err(e) => return Outcome::error(format!("{DPKG_STATUS}: {e}")),
        };
        let have = installed(&status);
        let mut f = Findings::new();
        for pattern in &self.absent {
            let found: Vec<&String> = have.iter().filter(|p| wildcard_match(pattern, p)).collect();
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
        };
        assert_eq!(c.eval(&t).status, Status::Fail);
        let c = PackageCheck {
            absent: vec!["nis".into()],
            present: vec!["auditd".into()],
        };
        assert_eq!(c.eval(&t).status, Status::Pass);
        let c = PackageCheck {
            absent: vec![],
            present: vec!["openssh-server".into()],
        };
        assert_eq!(c.eval(&t).status, Status::Fail);
    }
}

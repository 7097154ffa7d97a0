//! `mount`: a path is a separate mount and carries the required options.
//! Offline: /etc/fstab. Live: /proc/self/mountinfo.

use crate::fsutil::unescape_octal;
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountCheck {
    pub path: String,
    /// The path must be a mount point of its own.
    #[serde(default)]
    pub separate: bool,
    /// Options the mount must carry (`nodev`, `nosuid`, `noexec`, ...).
    #[serde(default)]
    pub options: Vec<String>,
}

/// One fstab entry.
#[derive(Debug, Clone, PartialEq)]
pub struct FstabEntry {
    pub spec: String,
    pub mount: String,
    pub fstype: String,
    pub options: Vec<String>,
    pub line: usize,
}

pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            Some(FstabEntry {
                spec: unescape_octal(f[0]),
                mount: unescape_octal(f[1]),
                fstype: f[2].to_string(),
                options: f[3].split(',').map(str::to_string).collect(),
                line: i + 1,
            })
        })
        .collect()
}

/// A mount from /proc/self/mountinfo: mount point, file-system type and
/// the per-mount plus super-block options.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMount {
    pub mount: String,
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

pub fn parse_mountinfo(text: &str) -> Vec<LiveMount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let lf: Vec<&str> = left.split(' ').collect();
            let rf: Vec<&str> = right.split(' ').collect();
            if lf.len() < 6 || rf.len() < 3 {
                return None;
            }
            let mut options: Vec<String> = lf[5].split(',').map(str::to_string).collect();
            options.extend(rf[2].split(',').map(str::to_string));
            Some(LiveMount {
                mount: unescape_octal(lf[4]),
                fstype: rf[0].to_string(),
                source: unescape_octal(rf[1]),
                options,
            })
        })
        .collect()
}

impl MountCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("path `{}` must be absolute", self.path));
        }
        if !self.separate && self.options.is_empty() {
            return Err("give `separate: true` or some `options`".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut s = format!("mount {}", self.path);
        if self.separate {
            s.push_str(" separate");
        }
        if !self.options.is_empty() {
            s.push_str(&format!(" with {}", self.options.join(",")));
        }
        s
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        if t.is_live() {
            let text = match t.read_to_string("/proc/self/mountinfo") {
                Ok(t) => t,
                Err(e) => return Outcome::error(format!("/proc/self/mountinfo: {e}")),
            };
            let mounts = parse_mountinfo(&text);
            // The last mount on a path is the one in effect.
            let found = mounts.iter().rfind(|m| m.mount == self.path);
            let Some(m) = found else {
                return Outcome::fail(format!("{} is not a mount point", self.path));
            };
            let at = format!("mountinfo: {} on {} type {}", m.source, m.mount, m.fstype);
            self.judge(&m.options, &at)
        } else {
            let text = match t.read_optional("/etc/fstab") {
                Ok(Some(t)) => t,
                Ok(None) => return Outcome::fail("/etc/fstab does not exist"),
                Err(e) => return Outcome::error(format!("/etc/fstab: {e}")),
            };
            let entries = parse_fstab(&text);
            let found = entries.iter().rfind(|e| e.mount == self.path);
            let Some(e) = found else {
                return Outcome::fail(format!("/etc/fstab has no entry for {}", self.path));
            };
            let at = format!("/etc/fstab:{}: {} {} {}", e.line, e.spec, e.mount, e.fstype);
            self.judge(&e.options, &at)
        }
    }

    fn judge(&self, options: &[String], at: &str) -> Outcome {
        let mut f = Findings::new();
        if self.separate {
            f.ok(format!("{at} (separate)"));
        }
        let missing: Vec<&String> = self
            .options
            .iter()
            .filter(|o| !options.contains(o))
            .collect();
        if !self.options.is_empty() {
            if missing.is_empty() {
                f.ok(format!("{at}: has {}", self.options.join(",")));
            } else {
                f.bad(format!(
                    "{at}: options {} lack {}",
                    options.join(","),
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        }
        f.finish()
    }
}

crate::register_kind!("mount", MountCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;

    #[test]
    fn fstab_and_mountinfo_parse() {
        let e = parse_fstab(
            "# c\nUUID=ab / ext4 errors=remount-ro 0 1\ntmpfs /dev/shm tmpfs nodev,nosuid,noexec 0 0\n",
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].mount, "/dev/shm");
        assert_eq!(e[1].line, 3);
        let m = parse_mountinfo(
            "25 1 254:3 / /tmp rw,nosuid,nodev,noexec,relatime shared:3 - ext4 /dev/vda7 rw\n\
             26 22 0:23 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64\n",
        );
        assert_eq!(m[0].mount, "/tmp");
        assert!(m[0].options.contains(&"noexec".to_string()));
        assert_eq!(m[1].fstype, "tmpfs");
        assert!(!m[1].options.contains(&"noexec".to_string()));
    }

    #[test]
    fn offline_uses_fstab() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/fstab"),
            "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let c: MountCheck = serde_yaml::from_str(
            "{ path: /tmp, separate: true, options: [nodev, nosuid, noexec] }",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        std::fs::write(
            d.path().join("etc/fstab"),
            "UUID=1 /tmp ext4 nodev,nosuid 0 2\n",
        )
        .unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.evidence.iter().any(|e| e.contains("lack noexec")),
            "{o:?}"
        );
        std::fs::write(
            d.path().join("etc/fstab"),
            "UUID=1 /tmp ext4 nodev,nosuid,noexec 0 2\n",
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Pass);
    }
}

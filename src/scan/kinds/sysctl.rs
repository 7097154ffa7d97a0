//! `sysctl`: a kernel parameter. Offline: the value systemd-sysctl would
//! apply from the sysctl.d directories (same-named files in earlier
//! directories win; all files apply in name order, later settings override
//! earlier ones). Live: the running value in /proc/sys, and the same
//! persistent configuration, so a reboot keeps it.

use crate::scan::expect::{Expect, deserialize_expect};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::{Target, wildcard_match};
use serde::Deserialize;

/// The directories systemd-sysctl reads, highest priority first.
pub const SYSCTL_DIRS: &[&str] = &[
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysctlCheck {
    pub key: String,
    #[serde(deserialize_with = "deserialize_expect")]
    pub value: Expect,
}

/// One setting: where it was made and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub file: String,
    pub line: usize,
    pub pattern: String,
    pub value: String,
}

/// The files systemd-sysctl would apply, in application order.
pub fn sysctl_files(t: &Target) -> std::io::Result<Vec<String>> {
    t.config_files(SYSCTL_DIRS, ".conf")
}

fn normalize_key(k: &str) -> String {
    k.trim().replace('/', ".")
}

/// Every setting of every applied file, in order.
pub fn settings(t: &Target) -> std::io::Result<Vec<Setting>> {
    let mut out = Vec::new();
    for file in sysctl_files(t)? {
        let Some(text) = t.read_optional(&file)? else {
            continue;
        };
        for (i, raw) in text.lines().enumerate() {
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            let k = k.trim().trim_start_matches('-');
            out.push(Setting {
                file: file.clone(),
                line: i + 1,
                pattern: normalize_key(k),
                value: v.trim().to_string(),
            });
        }
    }
    Ok(out)
}

/// The effective configured value of `key`: the last setting whose key
/// (or glob pattern) matches it.
pub fn effective(settings: &[Setting], key: &str) -> Option<Setting> {
    let key = normalize_key(key);
    settings
        .iter()
        .rfind(|s| s.pattern == key || (s.pattern.contains('*') && glob_key(&s.pattern, &key)))
        .cloned()
}

fn glob_key(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    p.len() == k.len() && p.iter().zip(&k).all(|(a, b)| wildcard_match(a, b))
}

impl SysctlCheck {
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.key.is_empty()
            && self
                .key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            return Err(format!("`{}` is not a sysctl key", self.key));
        }
        self.value.validate()
    }

    pub fn describe(&self) -> String {
        format!("sysctl {} {}", self.key, self.value.describe())
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let all = match settings(t) {
            Ok(s) => s,
            Err(e) => return Outcome::error(format!("reading sysctl.d: {e}")),
        };
        let mut f = Findings::new();
        match effective(&all, &self.key) {
            Some(s) => match self.value.test(Some(&s.value)) {
                Ok(()) => f.ok(format!("{}:{}: {} = {}", s.file, s.line, self.key, s.value)),
                Err(why) => f.bad(format!("{}:{}: {} {why}", s.file, s.line, self.key)),
            },
            None => f.bad(format!(
                "{} is not set in sysctl.d (the kernel default applies)",
                self.key
            )),
        }
        if t.is_live() {
            let proc = format!("/proc/sys/{}", self.key.replace('.', "/"));
            match t.read_to_string(&proc) {
                Ok(v) => {
                    let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                    match self.value.test(Some(&v)) {
                        Ok(()) => f.ok(format!("{proc}: {v} (running)")),
                        Err(why) => f.bad(format!("{proc}: running value {why}")),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    f.note(format!("{proc}: not present in the running kernel"))
                }
                Err(e) => f.err(format!("{proc}: {e}")),
            }
        }
        f.finish()
    }
}

crate::register_kind!("sysctl", SysctlCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc/sysctl.d")).unwrap();
        fs::create_dir_all(r.join("usr/lib/sysctl.d")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        // systemd's 50-default.conf sets rp_filter by glob.
        fs::write(
            r.join("usr/lib/sysctl.d/50-default.conf"),
            "net.ipv4.conf.default.rp_filter = 2\nnet.ipv4.conf.*.rp_filter = 2\n-net.ipv4.conf.all.accept_source_route = 0\n",
        )
        .unwrap();
        {
            let t = Target::root(r).unwrap();
            (d, t)
        }
    }

    fn chk(key: &str, v: &str) -> SysctlCheck {
        SysctlCheck {
            key: key.into(),
            value: Expect::equals(v),
        }
    }

    #[test]
    fn globs_and_minus_prefix_apply() {
        let (_d, t) = tree();
        let o = chk("net.ipv4.conf.all.rp_filter", "1").eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("50-default.conf:2"), "{o:?}");
        assert_eq!(
            chk("net.ipv4.conf.all.accept_source_route", "0")
                .eval(&t)
                .status,
            Status::Pass
        );
    }

    #[test]
    fn later_file_names_override_and_etc_masks_usr() {
        let (d, t) = tree();
        fs::write(
            d.path().join("etc/sysctl.d/60-harden.conf"),
            "net/ipv4/conf/all/rp_filter=1\n",
        )
        .unwrap();
        assert_eq!(
            chk("net.ipv4.conf.all.rp_filter", "1").eval(&t).status,
            Status::Pass
        );
        // A same-named file in /etc replaces the one in /usr/lib.
        fs::write(d.path().join("etc/sysctl.d/50-default.conf"), "# masked\n").unwrap();
        assert_eq!(
            chk("net.ipv4.conf.default.rp_filter", "1").eval(&t).status,
            Status::Fail
        );
        assert!(
            chk("net.ipv4.conf.default.rp_filter", "1")
                .eval(&t)
                .evidence[0]
                .contains("not set"),
        );
    }

    #[test]
    fn unset_is_a_failure_offline() {
        let (_d, t) = tree();
        let o = chk("net.ipv4.ip_forward", "0").eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("kernel default"));
    }
}

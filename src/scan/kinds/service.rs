//! `service`: a systemd unit is enabled, disabled (absent, masked or not
//! wanted by anything), masked, and, live, active or not.
//! Offline: unit files and the symlinks `systemctl enable` makes.
//! Live: `systemctl is-enabled` and `systemctl is-active`.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

/// Unit search path, highest priority first.
pub const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCheck {
    pub name: Option<String>,
    #[serde(default)]
    pub names: Vec<String>,
    /// true: starts at boot; false: does not (absent, masked or disabled).
    pub enabled: Option<bool>,
    pub masked: Option<bool>,
    /// Checked on live targets only.
    pub active: Option<bool>,
}

/// What offline inspection finds about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitState {
    Absent,
    Masked(String),
    /// Unit file found; the symlinks that enable it (empty: disabled).
    Present {
        file: String,
        wanted_by: Vec<String>,
        sysv: bool,
    },
}

pub fn unit_name(n: &str) -> String {
    if n.contains('.') {
        n.to_string()
    } else {
        format!("{n}.service")
    }
}

/// Inspect `unit` in an offline tree.
pub fn offline_state(t: &Target, unit: &str) -> std::io::Result<UnitState> {
    let mut file = None;
    for dir in UNIT_DIRS {
        let p = format!("{dir}/{unit}");
        if let Ok(md) = t.symlink_metadata(&p) {
            if md.is_symlink() {
                let link = t.read_link(&p)?;
                if link == "/dev/null" {
                    return Ok(UnitState::Masked(p));
                }
            }
            file = Some(p);
            break;
        }
    }
    let mut wanted_by = Vec::new();
    for dir in [
        "/etc/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ] {
        for entry in t.list_dir(dir)? {
            if entry.ends_with(".wants") || entry.ends_with(".requires") {
                let p = format!("{dir}/{entry}/{unit}");
                if t.symlink_metadata(&p).is_ok() && !wanted_by.contains(&p) {
                    wanted_by.push(p);
                }
            }
        }
    }
    // Packages without a unit: the SysV script and its rc?.d start links.
    let base = unit.trim_end_matches(".service");
    let mut sysv = false;
    if file.is_none() && t.exists(&format!("/etc/init.d/{base}")) {
        file = Some(format!("/etc/init.d/{base}"));
        sysv = true;
        for rl in ["rc2.d", "rc3.d", "rc4.d", "rc5.d"] {
            for e in t.list_dir(&format!("/etc/{rl}"))? {
                if e.starts_with('S') && e.get(3..) == Some(base) {
                    wanted_by.push(format!("/etc/{rl}/{e}"));
                }
            }
        }
    }
    Ok(match file {
        None => UnitState::Absent,
        Some(file) => UnitState::Present {
            file,
            wanted_by,
            sysv,
        },
    })
}

impl ServiceCheck {
    pub fn units(&self) -> Vec<String> {
        self.name
            .iter()
            .chain(self.names.iter())
            .map(|n| unit_name(n))
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.units().is_empty() {
            return Err("give `name` or `names`".into());
        }
        if self.enabled.is_none() && self.masked.is_none() && self.active.is_none() {
            return Err("say what to check: `enabled`, `masked` or `active`".into());
        }
        if self.masked == Some(true) && self.enabled == Some(true) {
            return Err("a masked unit cannot be enabled".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut s = format!("service {}", self.units().join(", "));
        if let Some(e) = self.enabled {
            s.push_str(if e { " enabled" } else { " not enabled" });
        }
        if let Some(m) = self.masked {
            s.push_str(if m { " masked" } else { " not masked" });
        }
        if let Some(a) = self.active {
            s.push_str(if a { " active" } else { " inactive" });
        }
        s
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let mut f = Findings::new();
        for unit in self.units() {
            // Enablement is what the unit files say, live too: that is
            // what `systemctl is-enabled` reads, and asking systemd for
            // every unit file's state takes seconds on a small VM.
            self.eval_files(t, &unit, &mut f);
            if t.is_live() {
                self.eval_active(t, &unit, &mut f);
            }
        }
        f.finish()
    }

    fn eval_files(&self, t: &Target, unit: &str, f: &mut Findings) {
        let state = match offline_state(t, unit) {
            Ok(s) => s,
            Err(e) => {
                f.err(format!("{unit}: {e}"));
                return;
            }
        };
        let (enabled, masked, where_) = match &state {
            UnitState::Absent => (false, false, format!("{unit}: not installed")),
            UnitState::Masked(p) => (false, true, format!("{p} -> /dev/null (masked)")),
            UnitState::Present {
                file,
                wanted_by,
                sysv,
            } if wanted_by.is_empty() => (
                false,
                false,
                format!(
                    "{file}: {} and not enabled",
                    if *sysv { "SysV script" } else { "installed" }
                ),
            ),
            UnitState::Present { wanted_by, .. } => {
                (true, false, format!("enabled: {}", wanted_by.join(", ")))
            }
        };
        if let Some(want) = self.enabled {
            f.check(enabled == want, where_.clone());
        }
        if let Some(want) = self.masked {
            f.check(masked == want, where_.clone());
        }
        if self.active.is_some() && !t.is_live() {
            f.note(format!("{unit}: activity is checked on a live system only"));
        }
    }

    fn eval_active(&self, t: &Target, unit: &str, f: &mut Findings) {
        let Some(want) = self.active else { return };
        let loaded = t.fact("systemd units", || live_units(t));
        match loaded.as_ref() {
            Ok(units) => {
                let state = units.get(unit).map_or("inactive", |s| s.as_str());
                f.check((state == "active") == want, format!("{unit}: {state}"));
            }
            Err(e) => f.err(e.clone()),
        }
    }
}

/// The activity of every unit systemd has loaded (`systemctl list-units
/// --all`), asked once per scan. A unit it does not list is inactive.
fn live_units(t: &Target) -> Result<std::collections::HashMap<String, String>, String> {
    let text = t.stdout(
        "systemctl",
        &[
            "list-units",
            "--all",
            "--no-legend",
            "--no-pager",
            "--plain",
        ],
    )?;
    Ok(text
        .lines()
        .filter_map(|l| {
            // UNIT LOAD ACTIVE SUB DESCRIPTION
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3).then(|| (w[0].to_string(), w[2].to_string()))
        })
        .collect())
}

crate::register_kind!("service", ServiceCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("usr/lib/systemd/system")).unwrap();
        fs::create_dir_all(r.join("etc/systemd/system/multi-user.target.wants")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        fs::write(r.join("usr/lib/systemd/system/auditd.service"), "[Unit]\n").unwrap();
        fs::write(r.join("usr/lib/systemd/system/rsync.service"), "[Unit]\n").unwrap();
        {
            let t = Target::root(r).unwrap();
            (d, t)
        }
    }

    fn chk(y: &str) -> ServiceCheck {
        let c: ServiceCheck = serde_yaml::from_str(y).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn enabled_means_wanted() {
        let (d, t) = tree();
        let c = chk("{ name: auditd, enabled: true, active: true }");
        assert_eq!(c.eval(&t).status, Status::Fail);
        symlink(
            "/lib/systemd/system/auditd.service",
            d.path()
                .join("etc/systemd/system/multi-user.target.wants/auditd.service"),
        )
        .unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Pass, "{o:?}");
    }

    #[test]
    fn disabled_accepts_absent_masked_and_unwanted() {
        let (d, t) = tree();
        let c = chk("{ names: [avahi-daemon, rsync], enabled: false }");
        assert_eq!(c.eval(&t).status, Status::Pass);
        symlink(
            "/lib/systemd/system/rsync.service",
            d.path()
                .join("etc/systemd/system/multi-user.target.wants/rsync.service"),
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        let m = chk("{ name: rsync, masked: true }");
        assert_eq!(m.eval(&t).status, Status::Fail);
        symlink(
            "/dev/null",
            d.path().join("etc/systemd/system/rsync.service"),
        )
        .unwrap();
        assert_eq!(m.eval(&t).status, Status::Pass);
        assert_eq!(c.eval(&t).status, Status::Pass);
    }

    #[test]
    fn activity_alone_is_not_applicable_offline() {
        let (_d, t) = tree();
        assert_eq!(
            chk("{ name: auditd, active: true }").eval(&t).status,
            Status::NotApplicable
        );
    }
}

//! `apparmor`: AppArmor confines with its whole policy. Live: the kernel
//! module is enabled and every loaded profile is in enforce mode (or, with
//! `allow_complain`, complain mode), and at least one is loaded. Offline:
//! the image's profiles in /etc/apparmor.d: none is disabled
//! (`disable/`), forced into complain mode (`force-complain/`), or
//! declared with `flags=(complain)` unless complain is allowed.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

const POLICY: &str = "/etc/apparmor.d";
const ENABLED: &str = "/sys/module/apparmor/parameters/enabled";
const PROFILES: &str = "/sys/kernel/security/apparmor/profiles";
/// Directories of /etc/apparmor.d that hold no profiles of their own.
const NOT_PROFILES: &[&str] = &[
    "abi",
    "abstractions",
    "tunables",
    "local",
    "disable",
    "force-complain",
    "cache",
    "apache2.d",
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppArmorCheck {
    /// Profiles may be in complain mode (CIS Level 1); otherwise every
    /// one must enforce (Level 2, STIG).
    #[serde(default)]
    pub allow_complain: bool,
}

/// Loaded profiles and their modes, from the kernel's list
/// (`name (mode)` per line).
pub fn loaded_profiles(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (name, mode) = l.trim().rsplit_once(" (")?;
            Some((name.to_string(), mode.trim_end_matches(')').to_string()))
        })
        .collect()
}

impl AppArmorCheck {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    pub fn describe(&self) -> String {
        if self.allow_complain {
            "AppArmor enabled, every profile enforcing or complaining".into()
        } else {
            "AppArmor enabled, every profile enforcing".into()
        }
    }

    fn mode_ok(&self, mode: &str) -> bool {
        matches!(mode, "enforce" | "kill") || (self.allow_complain && mode == "complain")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        if t.is_live() {
            self.eval_live(t)
        } else {
            self.eval_offline(t)
        }
    }

    fn eval_live(&self, t: &Target) -> Outcome {
        let mut f = Findings::new();
        match t.read_optional(ENABLED) {
            Ok(Some(v)) => f.check(v.trim() == "Y", format!("{ENABLED}: {}", v.trim())),
            Ok(None) => {
                return Outcome::fail(format!(
                    "{ENABLED} does not exist: no AppArmor in the kernel"
                ));
            }
            Err(e) => return Outcome::error(format!("{ENABLED}: {e}")),
        }
        let text = match t.read_optional(PROFILES) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Outcome::fail(format!(
                    "{PROFILES} does not exist (securityfs not mounted, or AppArmor off)"
                ));
            }
            Err(e) => return Outcome::error(format!("{PROFILES}: {e}")),
        };
        let profiles = loaded_profiles(&text);
        let bad: Vec<String> = profiles
            .iter()
            .filter(|(_, m)| !self.mode_ok(m))
            .map(|(n, m)| format!("{n} ({m})"))
            .collect();
        f.check(
            !profiles.is_empty(),
            format!("{} profiles loaded", profiles.len()),
        );
        f.none_of(&bad, "every profile enforces", "not enforcing");
        f.finish()
    }

    fn eval_offline(&self, t: &Target) -> Outcome {
        let entries = match t.read_dir(POLICY) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::fail(format!("{POLICY} does not exist: no AppArmor policy"));
            }
            Err(e) => return Outcome::error(format!("{POLICY}: {e}")),
        };
        let mut f = Findings::new();
        let mut profiles = 0;
        let mut bad = Vec::new();
        for (name, md) in &entries {
            if !md.is_file() || NOT_PROFILES.contains(&name.as_str()) || name.starts_with('.') {
                continue;
            }
            profiles += 1;
            let path = format!("{POLICY}/{name}");
            if t.symlink_metadata(&format!("{POLICY}/disable/{name}"))
                .is_ok()
            {
                bad.push(format!("{path}: disabled"));
            }
            if !self.allow_complain
                && t.symlink_metadata(&format!("{POLICY}/force-complain/{name}"))
                    .is_ok()
            {
                bad.push(format!("{path}: forced to complain"));
            }
            if !self.allow_complain {
                match t.read_to_string(&path) {
                    Ok(text) => {
                        if let Some((i, _)) = text.lines().enumerate().find(|(_, l)| {
                            let l = l.split('#').next().unwrap_or("");
                            l.contains("flags=") && l.contains("complain")
                        }) {
                            bad.push(format!("{path}:{}: complain mode", i + 1));
                        }
                    }
                    Err(e) => return Outcome::error(format!("{path}: {e}")),
                }
            }
        }
        f.check(profiles > 0, format!("{profiles} profiles in {POLICY}"));
        f.none_of(
            &bad,
            "no profile disabled or in complain mode",
            "not enforcing",
        );
        f.finish()
    }
}

crate::register_kind!("apparmor", AppArmorCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    #[test]
    fn kernel_list_parses() {
        let p = loaded_profiles("/usr/sbin/dhclient (enforce)\nnvidia_modprobe//kmod (complain)\n");
        assert_eq!(
            p[1],
            ("nvidia_modprobe//kmod".to_string(), "complain".to_string())
        );
        let strict = AppArmorCheck::default();
        assert!(strict.mode_ok("enforce") && !strict.mode_ok("complain"));
        assert!(
            AppArmorCheck {
                allow_complain: true
            }
            .mode_ok("complain")
        );
    }

    #[test]
    fn offline_policy_is_judged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("etc/apparmor.d");
        fs::create_dir_all(p.join("disable")).unwrap();
        fs::create_dir_all(p.join("abstractions")).unwrap();
        fs::write(
            p.join("sbin.dhclient"),
            "/{,usr/}sbin/dhclient flags=(attach_disconnected) {\n}\n",
        )
        .unwrap();
        let c = AppArmorCheck::default();
        let eval = || c.eval(&Target::root(d.path()).unwrap());
        assert_eq!(eval().status, Status::Pass, "{:?}", eval());
        fs::write(
            p.join("lsb_release"),
            "profile lsb_release flags=(complain) {\n}\n",
        )
        .unwrap();
        let o = eval();
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.evidence.join("\n").contains("lsb_release:1: complain"),
            "{o:?}"
        );
        fs::remove_file(p.join("lsb_release")).unwrap();
        std::os::unix::fs::symlink(
            "/etc/apparmor.d/sbin.dhclient",
            p.join("disable/sbin.dhclient"),
        )
        .unwrap();
        assert_eq!(eval().status, Status::Fail);
        fs::remove_dir_all(&p).unwrap();
        assert_eq!(eval().status, Status::Fail, "no policy at all");
    }
}

//! `cron`: who may schedule jobs, for cron and for at. Both tools decide
//! by an allow list when one exists and fall back to a deny list (or to
//! everyone) when it does not. The check wants the allow lists: present,
//! root's, not writable or readable by others, naming only the users
//! given; and no deny lists beside them. `at` is judged only when it is
//! installed.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronCheck {
    /// The only users the allow lists may name.
    pub allow: Vec<String>,
}

/// (tool, its program, its allow list, its deny list).
const TOOLS: &[(&str, &str, &str, &str)] = &[
    (
        "cron",
        "/usr/bin/crontab",
        "/etc/cron.allow",
        "/etc/cron.deny",
    ),
    ("at", "/usr/bin/at", "/etc/at.allow", "/etc/at.deny"),
];

impl CronCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.allow.is_empty() {
            return Err("name the users `allow` lets schedule jobs".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "cron and at: allow lists only, naming only {}",
            self.allow.join(", ")
        )
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let mut f = Findings::new();
        for (tool, program, allow, deny) in TOOLS {
            if !t.exists(program) {
                f.note(format!("{tool}: {program} not installed"));
                continue;
            }
            match t.metadata(allow) {
                Ok(md) => {
                    f.check(
                        md.is_file() && md.uid == 0 && md.mode & 0o137 == 0,
                        format!("{allow}: uid {} mode {:04o}", md.uid, md.mode),
                    );
                    let text = match t.read_to_string(allow) {
                        Ok(s) => s,
                        Err(e) => return Outcome::error(format!("{allow}: {e}")),
                    };
                    let others: Vec<String> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .filter(|u| !self.allow.iter().any(|a| a == u))
                        .map(str::to_string)
                        .collect();
                    f.none_of(&others, format!("{allow}: only allowed users"), allow);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    f.bad(format!(
                        "{allow} does not exist: {tool} falls back to {deny}"
                    ));
                }
                Err(e) => return Outcome::error(format!("{allow}: {e}")),
            }
            f.check(
                !t.exists(deny),
                if t.exists(deny) {
                    format!("{deny} exists beside the allow list")
                } else {
                    format!("{deny}: absent")
                },
            );
        }
        f.finish()
    }
}

crate::register_kind!("cron", CronCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn allow_lists_for_every_installed_tool() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/crontab"), "").unwrap();
        fs::write(r.join("etc/cron.allow"), "# who\nroot\n").unwrap();
        fs::set_permissions(r.join("etc/cron.allow"), fs::Permissions::from_mode(0o640)).unwrap();
        let c = CronCheck {
            allow: vec!["root".into(), "vcap".into()],
        };
        let eval = || c.eval(&Target::root(r).unwrap());
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(eval().status, Status::Pass, "{:?}", eval());
        }
        // A deny list beside it, another user, then `at` installed
        // without its allow list.
        fs::write(r.join("etc/cron.deny"), "").unwrap();
        assert_eq!(eval().status, Status::Fail);
        fs::remove_file(r.join("etc/cron.deny")).unwrap();
        fs::write(r.join("etc/cron.allow"), "root\nalice\n").unwrap();
        assert!(eval().evidence.join("\n").contains("alice"), "{:?}", eval());
        fs::write(r.join("etc/cron.allow"), "root\n").unwrap();
        fs::write(r.join("usr/bin/at"), "").unwrap();
        let o = eval();
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.evidence
                .join("\n")
                .contains("/etc/at.allow does not exist"),
            "{o:?}"
        );
    }
}

//! `fs_walk`: properties of every file in the tree: world-writable
//! directories carry the sticky bit, no world-writable files, set-id
//! programs only from an allowlist, every file owned by a known user and
//! group. Pseudo file systems (/proc, /sys, /dev, /run) are skipped.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use serde::Deserialize;
use std::collections::BTreeSet;

const ALWAYS_SKIPPED: &[&str] = &["/proc", "/sys", "/dev", "/run"];
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "pstore",
    "efivarfs",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "autofs",
    "binfmt_misc",
    "rpc_pipefs",
    "nfs",
    "nfs4",
    "cifs",
    "fuse",
    "overlay",
    "squashfs",
    "nsfs",
];
const SHOWN: usize = 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsWalkCheck {
    #[serde(default)]
    pub sticky_world_writable_dirs: bool,
    #[serde(default)]
    pub no_world_writable_files: bool,
    /// The only files allowed to be setuid or setgid.
    pub suid_sgid_allowed: Option<Vec<String>>,
    #[serde(default)]
    pub no_unowned: bool,
    /// In-target paths not walked.
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl FsWalkCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !self.sticky_world_writable_dirs
            && !self.no_world_writable_files
            && self.suid_sgid_allowed.is_none()
            && !self.no_unowned
        {
            return Err("enable at least one rule".into());
        }
        for e in self
            .exclude
            .iter()
            .chain(self.suid_sgid_allowed.iter().flatten())
        {
            if !e.starts_with('/') {
                return Err(format!("`{e}` must be an absolute path"));
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if self.sticky_world_writable_dirs {
            p.push("world-writable directories are sticky".to_string());
        }
        if self.no_world_writable_files {
            p.push("no world-writable files".to_string());
        }
        if let Some(a) = &self.suid_sgid_allowed {
            p.push(format!("set-id programs only: {}", a.join(", ")));
        }
        if self.no_unowned {
            p.push("every file has a known owner and group".to_string());
        }
        p.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let mut skip: BTreeSet<String> = ALWAYS_SKIPPED
            .iter()
            .map(|s| s.to_string())
            .chain(self.exclude.iter().cloned())
            .collect();
        if t.is_live() {
            match t.read_to_string("/proc/self/mountinfo") {
                Ok(text) => {
                    for m in super::mount::parse_mountinfo(&text) {
                        if PSEUDO_FS.contains(&m.fstype.as_str()) || m.fstype.starts_with("fuse.") {
                            skip.insert(m.mount);
                        }
                    }
                }
                Err(e) => return Outcome::error(format!("reading /proc/self/mountinfo: {e}")),
            }
        }
        let loaded = Users::load(t);
        let users = match loaded.as_ref() {
            Ok(u) => u,
            Err(e) => return Outcome::error(format!("reading users: {e}")),
        };
        let allowed: Option<BTreeSet<String>> = self.suid_sgid_allowed.as_ref().map(|list| {
            list.iter()
                .map(|p| t.canonical(p).unwrap_or_else(|_| p.clone()))
                .collect()
        });
        let mut sticky_bad = Vec::new();
        let mut ww_files = Vec::new();
        let mut setid_bad = Vec::new();
        let mut unowned = Vec::new();
        let mut unreadable = Vec::new();
        let mut walked = 0usize;
        let mut stack = vec![String::from("/")];
        while let Some(dir) = stack.pop() {
            let entries = match t.read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    unreadable.push(format!("{dir} ({e})"));
                    continue;
                }
            };
            for (name, md) in entries {
                let path = if dir == "/" {
                    format!("/{name}")
                } else {
                    format!("{dir}/{name}")
                };
                if skip.contains(&path) {
                    continue;
                }
                walked += 1;
                let mode = md.mode;
                if md.is_dir() {
                    if self.sticky_world_writable_dirs && mode & 0o002 != 0 && mode & 0o1000 == 0 {
                        sticky_bad.push(format!("{path} ({mode:04o})"));
                    }
                    stack.push(path.clone());
                } else if md.is_file() {
                    if self.no_world_writable_files && mode & 0o002 != 0 {
                        ww_files.push(format!("{path} ({mode:04o})"));
                    }
                    if let Some(allowed) = &allowed {
                        if mode & 0o6000 != 0 && !allowed.contains(&path) {
                            setid_bad.push(format!("{path} ({mode:04o})"));
                        }
                    }
                }
                if self.no_unowned
                    && !md.is_symlink()
                    && (!users.has_uid(md.uid) || !users.has_gid(md.gid))
                {
                    unowned.push(format!("{path} ({}:{})", md.uid, md.gid));
                }
            }
        }
        // A directory that could not be read may hide anything: that is
        // never a pass.
        if !unreadable.is_empty() {
            unreadable.sort();
            return Outcome::error(format!(
                "{} directories could not be read: {}",
                unreadable.len(),
                unreadable[..unreadable.len().min(SHOWN)].join(", ")
            ));
        }
        let mut f = Findings::new();
        f.note(format!("{walked} files walked"));
        let mut report = |on: bool, what: &str, bad: &mut Vec<String>| {
            if !on {
                return;
            }
            bad.sort();
            if bad.is_empty() {
                f.ok(format!("no {what}"));
            } else {
                let more = if bad.len() > SHOWN {
                    format!(" (and {} more)", bad.len() - SHOWN)
                } else {
                    String::new()
                };
                f.bad(format!(
                    "{} {what}: {}{more}",
                    bad.len(),
                    bad[..bad.len().min(SHOWN)].join(", ")
                ));
            }
        };
        report(
            self.sticky_world_writable_dirs,
            "world-writable directories without the sticky bit",
            &mut sticky_bad,
        );
        report(
            self.no_world_writable_files,
            "world-writable files",
            &mut ww_files,
        );
        report(
            allowed.is_some(),
            "set-id programs outside the allowlist",
            &mut setid_bad,
        );
        report(
            self.no_unowned,
            "files with an unknown owner or group",
            &mut unowned,
        );
        f.finish()
    }
}

crate::register_kind!("fs_walk", FsWalkCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_each_kind_of_offender() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::create_dir_all(r.join("tmp")).unwrap();
        fs::create_dir_all(r.join("proc/1")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(r.join("usr/bin/su"), "").unwrap();
        fs::write(r.join("usr/bin/mount"), "").unwrap();
        fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(r.join("usr/bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(r.join("proc/1"), fs::Permissions::from_mode(0o777)).unwrap();
        let t = Target::root(r).unwrap();
        let c = FsWalkCheck {
            sticky_world_writable_dirs: true,
            no_world_writable_files: true,
            suid_sgid_allowed: Some(vec!["/bin/su".into()]),
            no_unowned: false,
            exclude: vec![],
        };
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Pass, "{o:?}");
        fs::set_permissions(r.join("usr/bin/mount"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::create_dir_all(r.join("var/tmp")).unwrap();
        fs::set_permissions(r.join("var/tmp"), fs::Permissions::from_mode(0o777)).unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        let text = o.evidence.join("\n");
        assert!(text.contains("/usr/bin/mount (4755)"), "{text}");
        assert!(text.contains("/var/tmp (0777)"), "{text}");
        assert!(!text.contains("/proc"), "{text}");
    }
}

//! `fs_walk`: properties of every file in the tree: world-writable
//! directories carry the sticky bit, no world-writable files, set-id
//! programs only from an allowlist, every file owned by a known user and
//! group. Pseudo file systems (/proc, /sys, /dev, /run) are skipped.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
        let root = t.root_dir().to_path_buf();
        let mut skip: BTreeSet<PathBuf> = ALWAYS_SKIPPED
            .iter()
            .chain(
                self.exclude
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .map(|p| host(&root, p))
            .collect();
        if t.is_live() {
            if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
                for m in super::mount::parse_mountinfo(&text) {
                    if PSEUDO_FS.contains(&m.fstype.as_str()) || m.fstype.starts_with("fuse.") {
                        skip.insert(PathBuf::from(m.mount));
                    }
                }
            }
        }
        let users = match Users::load(t) {
            Ok(u) => u,
            Err(e) => return Outcome::error(format!("reading users: {e}")),
        };
        let allowed: Option<BTreeSet<String>> = self.suid_sgid_allowed.as_ref().map(|list| {
            list.iter()
                .map(|p| in_target(&root, &t.resolve(p).unwrap_or_else(|_| host(&root, p))))
                .collect()
        });
        let mut sticky_bad = Vec::new();
        let mut ww_files = Vec::new();
        let mut setid_bad = Vec::new();
        let mut unowned = Vec::new();
        let mut walked = 0usize;
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in rd.flatten() {
                let path = entry.path();
                if skip.contains(&path) {
                    continue;
                }
                let Ok(md) = entry.metadata() else { continue };
                walked += 1;
                let mode = md.permissions().mode();
                let ft = md.file_type();
                if ft.is_dir() {
                    if self.sticky_world_writable_dirs && mode & 0o002 != 0 && mode & 0o1000 == 0 {
                        sticky_bad.push(format!(
                            "{} ({:04o})",
                            in_target(&root, &path),
                            mode & 0o7777
                        ));
                    }
                    stack.push(path.clone());
                } else if ft.is_file() {
                    if self.no_world_writable_files && mode & 0o002 != 0 {
                        ww_files.push(format!(
                            "{} ({:04o})",
                            in_target(&root, &path),
                            mode & 0o7777
                        ));
                    }
                    if let Some(allowed) = &allowed {
                        if mode & 0o6000 != 0 {
                            let p = in_target(&root, &path);
                            if !allowed.contains(&p) {
                                setid_bad.push(format!("{p} ({:04o})", mode & 0o7777));
                            }
                        }
                    }
                }
                if self.no_unowned
                    && !ft.is_symlink()
                    && (!users.has_uid(md.uid()) || !users.has_gid(md.gid()))
                {
                    unowned.push(format!(
                        "{} ({}:{})",
                        in_target(&root, &path),
                        md.uid(),
                        md.gid()
                    ));
                }
            }
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

fn host(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn in_target(root: &Path, p: &Path) -> String {
    match p.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => p.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

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

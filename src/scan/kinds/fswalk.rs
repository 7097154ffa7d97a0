//! `fs_walk`: properties of every file in the tree: world-writable
//! directories carry the sticky bit, no world-writable files, set-id
//! programs only from an allowlist, every file owned by a known user and
//! group. Pseudo file systems (/proc, /sys, /dev, /run) are skipped.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

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

#[derive(Debug, Clone, Default, Deserialize)]
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
    /// Everything under these directories is owned by root and writable
    /// by nobody else (system commands, libraries).
    #[serde(default)]
    pub root_only_under: Vec<String>,
    /// With `root_only_under`: its directories are group root too.
    #[serde(default)]
    pub root_group_dirs: bool,
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
            && self.root_only_under.is_empty()
        {
            return Err("enable at least one rule".into());
        }
        for e in self
            .exclude
            .iter()
            .chain(self.suid_sgid_allowed.iter().flatten())
            .chain(&self.root_only_under)
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
        if !self.root_only_under.is_empty() {
            p.push(format!(
                "under {}: owned by root{}, writable by root only",
                self.root_only_under.join(", "),
                if self.root_group_dirs {
                    " (directories group root)"
                } else {
                    ""
                }
            ));
        }
        p.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let walked = t.fact("fs walk", || walk(t));
        let w = match walked.as_ref() {
            Ok(w) => w,
            Err(e) => return Outcome::error(e.clone()),
        };
        // Path::starts_with compares whole components: /usr/lib64 is not
        // under /usr/lib.
        let excluded = |path: &str| self.exclude.iter().any(|e| Path::new(path).starts_with(e));
        let allowed: Option<BTreeSet<String>> = self.suid_sgid_allowed.as_ref().map(|list| {
            list.iter()
                .map(|p| t.canonical(p).unwrap_or_else(|_| p.clone()))
                .collect()
        });
        let mut sticky_bad = Vec::new();
        let mut ww_files = Vec::new();
        let mut setid_bad = Vec::new();
        let mut unowned = Vec::new();
        let mut not_root_only = Vec::new();
        let under = |path: &str| {
            self.root_only_under
                .iter()
                .any(|d| path != d && Path::new(path).starts_with(d))
        };
        for e in w.flagged.iter().filter(|e| !excluded(&e.path)) {
            if under(&e.path) && !e.meta.is_symlink() {
                let m = &e.meta;
                if m.uid != 0
                    || m.mode & 0o022 != 0
                    || (self.root_group_dirs && m.is_dir() && m.gid != 0)
                {
                    not_root_only.push(format!("{} ({}:{} {:04o})", e.path, m.uid, m.gid, m.mode));
                }
            }
            let (path, mode) = (&e.path, e.meta.mode);
            if e.meta.is_dir() {
                if self.sticky_world_writable_dirs && mode & 0o002 != 0 && mode & 0o1000 == 0 {
                    sticky_bad.push(format!("{path} ({mode:04o})"));
                }
            } else if e.meta.is_file() {
                if self.no_world_writable_files && mode & 0o002 != 0 {
                    ww_files.push(format!("{path} ({mode:04o})"));
                }
                if let Some(allowed) = &allowed {
                    if mode & 0o6000 != 0 && !allowed.contains(path) {
                        setid_bad.push(format!("{path} ({mode:04o})"));
                    }
                }
            }
            if self.no_unowned && e.unowned {
                unowned.push(format!("{path} ({}:{})", e.meta.uid, e.meta.gid));
            }
        }
        let unreadable: Vec<&String> = w.unreadable.iter().filter(|d| !excluded(d)).collect();
        let walked = w.walked;
        // A directory that could not be read may hide anything: that is
        // never a pass.
        if !unreadable.is_empty() {
            return Outcome::error(format!(
                "{} directories could not be read: {}",
                unreadable.len(),
                unreadable[..unreadable.len().min(SHOWN)]
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if w.truncated {
            return Outcome::error(format!(
                "more than {MAX_FLAGGED} files are world-writable, set-id or unowned: \
                 not a tree to judge file by file"
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
        report(
            !self.root_only_under.is_empty(),
            "files or directories others own or can write",
            &mut not_root_only,
        );
        f.finish()
    }
}

/// A file the walk noted: writable by others, set-id, or not root's.
struct Flagged {
    path: String,
    meta: crate::scan::view::Meta,
    unowned: bool,
}

/// One walk of the whole tree, shared by every `fs_walk` control of a
/// scan. Only the files some rule may report are kept, at most
/// [`MAX_FLAGGED`], so memory stays bounded on any tree.
struct Walk {
    flagged: Vec<Flagged>,
    unreadable: Vec<String>,
    walked: usize,
    truncated: bool,
}

const MAX_FLAGGED: usize = 100_000;

/// An image's directories deeper than this are not read. A damaged ext4
/// can make a directory its own descendant, which no kernel allows; the
/// walk would follow such a loop without end.
const MAX_IMAGE_DEPTH: usize = 128;

/// The work an image walk may do, as the sum of the squared depths of the
/// directories it reads (the image view resolves every component of a
/// path from the root): a tree of 100,000 directories ten deep needs a
/// fifth of it, and it takes seconds. Past it, the image's directories
/// branch back into themselves and the walk stops.
const IMAGE_WALK_BUDGET: usize = 50_000_000;

fn walk(t: &Target) -> Result<Walk, String> {
    let mut skip: BTreeSet<String> = ALWAYS_SKIPPED.iter().map(|s| s.to_string()).collect();
    if t.is_live() {
        let text = t
            .read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        for m in super::mount::parse_mountinfo(&text) {
            if PSEUDO_FS.contains(&m.fstype.as_str()) || m.fstype.starts_with("fuse.") {
                skip.insert(m.mount);
            }
        }
    }
    let loaded = Users::load(t);
    let users = loaded
        .as_ref()
        .as_ref()
        .map_err(|e| format!("reading users: {e}"))?;
    let mut w = Walk {
        flagged: Vec::new(),
        unreadable: Vec::new(),
        walked: 0,
        truncated: false,
    };
    let image = t.kind() == "image";
    let mut spent = 0usize;
    let mut stack = vec![(String::from("/"), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if image && depth > MAX_IMAGE_DEPTH {
            w.unreadable.push(format!(
                "{dir} (deeper than {MAX_IMAGE_DEPTH} directories: a directory loop?)"
            ));
            continue;
        }
        spent = spent.saturating_add(depth * depth);
        if image && spent > IMAGE_WALK_BUDGET {
            w.unreadable.push(format!(
                "{dir} and what was left (the image's directories lead back into \
                 themselves: a walk of {} entries stopped)",
                w.walked
            ));
            break;
        }
        let entries = match t.read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                w.unreadable.push(format!("{dir} ({e})"));
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
            w.walked += 1;
            let unowned = !md.is_symlink() && (!users.has_uid(md.uid) || !users.has_gid(md.gid));
            // Only what some rule may report is kept: world- or
            // group-writable, set-id, unowned, or not root's.
            let interesting = !md.is_symlink()
                && (md.mode & 0o6022 != 0 || unowned || md.uid != 0 || md.gid != 0);
            if md.is_dir() {
                stack.push((path.clone(), depth + 1));
            }
            if interesting {
                if w.flagged.len() == MAX_FLAGGED {
                    w.truncated = true;
                } else {
                    w.flagged.push(Flagged {
                        path,
                        meta: md,
                        unowned,
                    });
                }
            }
        }
    }
    w.unreadable.sort();
    Ok(w)
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
            ..Default::default()
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
        // Root-only trees: a group-writable command, a directory of
        // another group.
        let c = FsWalkCheck {
            root_only_under: vec!["/usr/bin".into()],
            root_group_dirs: true,
            ..Default::default()
        };
        let fresh = || c.eval(&Target::root(r).unwrap());
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(fresh().status, Status::Pass, "{:?}", fresh());
        }
        fs::set_permissions(r.join("usr/bin/mount"), fs::Permissions::from_mode(0o775)).unwrap();
        let o = fresh();
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence.join("\n").contains("/usr/bin/mount"), "{o:?}");
    }
}

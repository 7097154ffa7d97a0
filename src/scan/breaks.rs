//! Break recipes: how to break each control, as data. A recipe is a few
//! small mutations of a hardened tree (write a file, append to one,
//! replace a line, chmod, remove, add a symlink or a directory). Proving a
//! control applies its recipe to a tree where it passes, scans that one
//! control, and puts the tree back: a control is proven when it passes
//! before and fails after. A control that cannot tell the two trees apart
//! checks nothing.

use super::outcome::Status;
use super::target::Target;
use crate::stage::Catalog;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One change to a tree. Paths are absolute inside the tree; a path may
/// hold wildcards when it names exactly one existing file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mutation {
    /// Create or replace a file with `content` (parents created).
    Write { path: String, content: String },
    /// Add `text` at the end of a file.
    Append { path: String, text: String },
    /// Replace every match of the multi-line regex `pattern` with `with`
    /// (`$1` for groups); the pattern must match.
    Replace {
        path: String,
        pattern: String,
        with: String,
    },
    /// Set a file's permission bits (octal).
    Chmod { path: String, mode: String },
    /// Give a file to numeric `uid` and `gid` (which need not exist).
    Chown { path: String, uid: u32, gid: u32 },
    /// Remove a file or symlink.
    Remove { path: String },
    /// Create a symlink to `target`.
    Symlink { path: String, target: String },
    /// Create a directory with `mode`.
    Mkdir { path: String, mode: String },
}

/// `break:` lists are written as single-key maps, like checks.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Mutation>, D::Error> {
    serde_yaml::with::singleton_map_recursive::deserialize(d)
}

impl Mutation {
    pub fn path(&self) -> &str {
        match self {
            Mutation::Write { path, .. }
            | Mutation::Append { path, .. }
            | Mutation::Replace { path, .. }
            | Mutation::Chmod { path, .. }
            | Mutation::Chown { path, .. }
            | Mutation::Remove { path }
            | Mutation::Symlink { path, .. }
            | Mutation::Mkdir { path, .. } => path,
        }
    }

    /// Problems a loader reports: a relative path, a bad mode or regex.
    pub fn validate(&self) -> Result<(), String> {
        if !self.path().starts_with('/') {
            return Err(format!("break: `{}` is not an absolute path", self.path()));
        }
        // `prove` resolves paths inside the tree, `..` too; a recipe that
        // names one path and changes another is refused.
        if !crate::stage::is_normalized_abs(self.path()) {
            return Err(format!(
                "break: `{}` is not a normalized path (no `.`, `..` or `//`)",
                self.path()
            ));
        }
        match self {
            Mutation::Chmod { mode, .. } | Mutation::Mkdir { mode, .. } => {
                u32::from_str_radix(mode, 8)
                    .map(|_| ())
                    .map_err(|_| format!("break: mode `{mode}` is not octal"))
            }
            Mutation::Replace { pattern, .. } => regex::Regex::new(&format!("(?m){pattern}"))
                .map(|_| ())
                .map_err(|e| format!("break: pattern `{pattern}`: {e}")),
            _ => Ok(()),
        }
    }
}

/// What a path held before a mutation, to put back.
enum Prior {
    Absent,
    File {
        bytes: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink(PathBuf),
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// The changes made to a tree, undone in reverse order.
#[derive(Default)]
pub struct Undo {
    steps: Vec<(PathBuf, Prior)>,
    made_dirs: Vec<PathBuf>,
}

impl Undo {
    /// Put every changed path back as it was.
    pub fn restore(self) -> Result<()> {
        for (host, prior) in self.steps.into_iter().rev() {
            if let Ok(md) = host.symlink_metadata() {
                if md.is_dir() && !matches!(prior, Prior::Dir { .. }) {
                    std::fs::remove_dir_all(&host)
                } else if !md.is_dir() {
                    std::fs::remove_file(&host)
                } else {
                    Ok(())
                }
                .with_context(|| format!("undoing {}", host.display()))?;
            }
            match prior {
                Prior::Absent => {}
                Prior::Dir { mode, uid, gid } => {
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))
                        .with_context(|| format!("restoring {}", host.display()))?;
                    crate::fsutil::lchown(&host, uid, gid)?;
                }
                Prior::File {
                    bytes,
                    mode,
                    uid,
                    gid,
                } => {
                    std::fs::write(&host, bytes)
                        .with_context(|| format!("restoring {}", host.display()))?;
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))?;
                    crate::fsutil::lchown(&host, uid, gid)?;
                }
                Prior::Symlink(target) => std::os::unix::fs::symlink(&target, &host)
                    .with_context(|| format!("restoring {}", host.display()))?,
            }
        }
        for d in self.made_dirs.into_iter().rev() {
            let _ = std::fs::remove_dir(&d);
        }
        Ok(())
    }
}

fn snapshot(host: &Path) -> Result<Prior> {
    let Ok(md) = host.symlink_metadata() else {
        return Ok(Prior::Absent);
    };
    Ok(if md.file_type().is_symlink() {
        Prior::Symlink(std::fs::read_link(host)?)
    } else if md.is_dir() {
        Prior::Dir {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }
    } else if md.is_file() {
        Prior::File {
            bytes: std::fs::read(host).with_context(|| format!("reading {}", host.display()))?,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }
    } else {
        bail!(
            "{} is neither a file, a symlink nor a directory",
            host.display()
        )
    })
}

/// Apply `muts` to the tree at `root`; the returned [`Undo`] puts it back
/// (also when a later mutation fails: it is restored before the error
/// returns).
pub fn apply(root: &Path, muts: &[Mutation]) -> Result<Undo> {
    let t = Target::root(root)?;
    let mut undo = Undo::default();
    for m in muts {
        if let Err(e) = apply_one(&t, m, &mut undo) {
            undo.restore()?;
            return Err(e);
        }
    }
    Ok(undo)
}

fn apply_one(t: &Target, m: &Mutation, undo: &mut Undo) -> Result<()> {
    let path = m.path();
    let path = if path.contains(['*', '?', '[']) {
        let found = t.glob(path)?;
        match found.as_slice() {
            [one] => one.clone(),
            _ => bail!("break: `{path}` matches {} paths, not one", found.len()),
        }
    } else {
        path.to_string()
    };
    let host = t.resolve_with(&path, false)?;
    if let Some(parent) = host.parent() {
        let mut missing = Vec::new();
        let mut p = parent.to_path_buf();
        while p.symlink_metadata().is_err() {
            missing.push(p.clone());
            if !p.pop() {
                break;
            }
        }
        for d in missing.into_iter().rev() {
            std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            undo.made_dirs.push(d);
        }
    }
    undo.steps.push((host.clone(), snapshot(&host)?));
    let existing =
        || std::fs::read_to_string(&host).with_context(|| format!("break: reading {path}"));
    match m {
        Mutation::Write { content, .. } => {
            if host.symlink_metadata().is_ok() {
                std::fs::remove_file(&host)?;
            }
            std::fs::write(&host, content)?;
        }
        Mutation::Append { text, .. } => {
            let mut s = existing()?;
            s.push_str(text);
            std::fs::write(&host, s)?;
        }
        Mutation::Replace { pattern, with, .. } => {
            let re = regex::Regex::new(&format!("(?m){pattern}"))?;
            let s = existing()?;
            if !re.is_match(&s) {
                bail!("break: `{pattern}` matches nothing in {path}");
            }
            std::fs::write(&host, re.replace_all(&s, with.as_str()).as_bytes())?;
        }
        Mutation::Chmod { mode, .. } => {
            let mode = u32::from_str_radix(mode, 8).context("octal mode")?;
            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("break: chmod {path}"))?;
        }
        Mutation::Chown { uid, gid, .. } => crate::fsutil::lchown(&host, *uid, *gid)
            .with_context(|| format!("break: chown {path}"))?,
        Mutation::Remove { .. } => {
            std::fs::remove_file(&host).with_context(|| format!("break: removing {path}"))?
        }
        Mutation::Symlink { target, .. } => std::os::unix::fs::symlink(target, &host)
            .with_context(|| format!("break: linking {path}"))?,
        Mutation::Mkdir { mode, .. } => {
            std::fs::create_dir(&host).with_context(|| format!("break: creating {path}"))?;
            let mode = u32::from_str_radix(mode, 8).context("octal mode")?;
            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// How one control fared: before and after its recipe.
#[derive(Debug, Clone, Serialize)]
pub struct Proof {
    pub id: String,
    pub intact: Status,
    /// `None` when the control has no recipe.
    pub broken: Option<Status>,
    /// The evidence of the broken run (or why it could not run).
    pub evidence: Vec<String>,
}

impl Proof {
    /// Passes as built, fails as broken.
    pub fn proven(&self) -> bool {
        self.intact == Status::Pass && self.broken == Some(Status::Fail)
    }
}

/// Prove the controls of `catalog` that apply to the tree at `root` (by
/// its distribution and roles in `ctx`; only `ids` when given). The tree
/// must be one they pass on; it is changed and put back once per control.
pub fn prove(
    catalog: &Catalog,
    root: &Path,
    ctx: &super::ScanContext,
    ids: &[String],
) -> Result<Vec<Proof>> {
    let mut out = Vec::new();
    for (stage, control) in catalog.controls() {
        if (!ids.is_empty() && !ids.contains(&control.id))
            || catalog
                .control_applies(stage, control, ctx, &Target::root(root)?)
                .is_err()
        {
            continue;
        }
        // A fresh target each time: nothing read before a change is
        // reused after it.
        let intact = control.check.eval(&Target::root(root)?);
        let (broken, evidence) = if control.breaks.is_empty() {
            (None, vec!["no break recipe".to_string()])
        } else {
            match apply(root, &control.breaks) {
                Ok(undo) => {
                    let o = control.check.eval(&Target::root(root)?);
                    undo.restore()
                        .with_context(|| format!("putting the tree back after {}", control.id))?;
                    (Some(o.status), o.evidence)
                }
                Err(e) => (Some(Status::Error), vec![format!("{e:#}")]),
            }
        };
        out.push(Proof {
            id: control.id.clone(),
            intact: intact.status,
            broken,
            evidence,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Mutation> {
        deserialize(serde_yaml::Deserializer::from_str(text)).unwrap()
    }

    #[test]
    fn mutations_apply_and_undo_exactly() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ssh")).unwrap();
        std::fs::set_permissions(r.join("etc"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(r.join("etc/fstab"), "a /tmp ext4 nodev 0 2\n").unwrap();
        std::fs::write(r.join("etc/issue"), "hello\n").unwrap();
        std::fs::set_permissions(r.join("etc/issue"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::os::unix::fs::symlink("/etc/issue", r.join("etc/issue.net")).unwrap();
        // Root can give a file away; anyone else only to themselves.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let to = if uid == 0 { 4242 } else { uid };
        let muts = parse(&format!(
            r#"
- write: {{ path: /etc/ssh/sshd_config.d/00-a.conf, content: "PermitRootLogin yes\n" }}
- replace: {{ path: /etc/fstab, pattern: 'nodev', with: 'defaults' }}
- append: {{ path: /etc/issue, text: "more\n" }}
- chmod: {{ path: /etc/issue, mode: "0666" }}
- chown: {{ path: /etc/fstab, uid: {to}, gid: {to} }}
- remove: {{ path: /etc/issue.net }}
- symlink: {{ path: /etc/x, target: /nowhere }}
- mkdir: {{ path: /var/lib/shared, mode: "0777" }}
- chmod: {{ path: /etc, mode: "0777" }}
"#
        ));
        muts.iter().for_each(|m| m.validate().unwrap());
        let undo = apply(r, &muts).unwrap();
        let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        assert_eq!(
            read("etc/ssh/sshd_config.d/00-a.conf"),
            "PermitRootLogin yes\n"
        );
        assert_eq!(read("etc/fstab"), "a /tmp ext4 defaults 0 2\n");
        assert_eq!(r.join("etc").metadata().unwrap().mode() & 0o7777, 0o777);
        assert_eq!(r.join("etc/fstab").metadata().unwrap().uid(), to);
        assert_eq!(read("etc/issue"), "hello\nmore\n");
        assert!(r.join("etc/issue.net").symlink_metadata().is_err());
        assert_eq!(
            r.join("var/lib/shared").metadata().unwrap().mode() & 0o7777,
            0o777
        );
        undo.restore().unwrap();
        assert!(!r.join("etc/ssh/sshd_config.d").exists(), "made parents go");
        assert!(!r.join("var").exists());
        assert_eq!(read("etc/fstab"), "a /tmp ext4 nodev 0 2\n");
        let md = r.join("etc/fstab").metadata().unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid), "owner put back");
        assert_eq!(read("etc/issue"), "hello\n");
        assert_eq!(
            r.join("etc/issue").metadata().unwrap().mode() & 0o7777,
            0o644
        );
        assert_eq!(
            std::fs::read_link(r.join("etc/issue.net")).unwrap(),
            Path::new("/etc/issue")
        );
        assert!(r.join("etc/x").symlink_metadata().is_err());
        assert_eq!(
            r.join("etc").metadata().unwrap().mode() & 0o7777,
            0o755,
            "a directory's mode is put back"
        );
    }

    #[test]
    fn a_recipe_that_does_not_apply_is_an_error_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/fstab"), "x\n").unwrap();
        let muts = parse(
            "- write: { path: /etc/new, content: x }\n- replace: { path: /etc/fstab, pattern: nodev, with: y }\n",
        );
        let e = apply(d.path(), &muts).err().unwrap();
        assert!(e.to_string().contains("matches nothing"), "{e}");
        assert!(!d.path().join("etc/new").exists());
        let bad = parse("- chmod: { path: etc/x, mode: \"9\" }\n");
        assert!(bad[0].validate().is_err());
    }
}

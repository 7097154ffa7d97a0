//! What a scan reads: a root tree (every path resolved inside the root,
//! symlinks included, never escaping it) or the live host.

use crate::exec;
use anyhow::{Context, Result, bail};
use std::io;
use std::path::{Path, PathBuf};

/// Symlink hops allowed while resolving one path (as the kernel's 40).
const MAX_HOPS: usize = 40;

#[derive(Debug, Clone)]
pub struct Target {
    root: PathBuf,
    live: bool,
}

impl Target {
    /// An offline root tree.
    pub fn root(dir: &Path) -> Result<Target> {
        let md = std::fs::metadata(dir).with_context(|| format!("scan root {}", dir.display()))?;
        if !md.is_dir() {
            bail!("scan root {} is not a directory", dir.display());
        }
        let root = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Target { root, live: false })
    }

    /// The running system this process is on.
    pub fn live() -> Target {
        Target {
            root: PathBuf::from("/"),
            live: true,
        }
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// A human description: `root tree /x` or `live host`.
    pub fn describe(&self) -> String {
        if self.live {
            "live host".to_string()
        } else {
            format!("root tree {}", self.root.display())
        }
    }

    /// The host path of the in-target absolute `path`, with every symlink
    /// (the last one too, when `follow_last`) resolved inside the root.
    pub fn resolve_with(&self, path: &str, follow_last: bool) -> io::Result<PathBuf> {
        if self.live {
            return Ok(PathBuf::from(path));
        }
        let mut done: Vec<String> = Vec::new();
        let mut todo: Vec<String> = split(path).into_iter().rev().collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            match comp.as_str() {
                "." | "" => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = self.host_path(&done).join(&comp);
            let is_last = todo.is_empty();
            match std::fs::symlink_metadata(&candidate) {
                Ok(md) if md.file_type().is_symlink() && (!is_last || follow_last) => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links resolving {path}"
                        )));
                    }
                    let link = std::fs::read_link(&candidate)?;
                    let link = link.to_string_lossy().into_owned();
                    if link.starts_with('/') {
                        done.clear();
                    }
                    for c in split(&link).into_iter().rev() {
                        todo.push(c);
                    }
                }
                _ => done.push(comp),
            }
        }
        Ok(self.host_path(&done))
    }

    fn host_path(&self, comps: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        for c in comps {
            p.push(c);
        }
        p
    }

    /// Host path of `path`, following every symlink.
    pub fn resolve(&self, path: &str) -> io::Result<PathBuf> {
        self.resolve_with(path, true)
    }

    pub fn read_to_string(&self, path: &str) -> io::Result<String> {
        let bytes = std::fs::read(self.resolve(path)?)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The text of `path`, or `None` when it does not exist.
    pub fn read_optional(&self, path: &str) -> io::Result<Option<String>> {
        match self.read_to_string(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn metadata(&self, path: &str) -> io::Result<std::fs::Metadata> {
        std::fs::metadata(self.resolve(path)?)
    }

    pub fn symlink_metadata(&self, path: &str) -> io::Result<std::fs::Metadata> {
        std::fs::symlink_metadata(self.resolve_with(path, false)?)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.metadata(path).is_ok()
    }

    /// The raw target of a symlink.
    pub fn read_link(&self, path: &str) -> io::Result<String> {
        Ok(std::fs::read_link(self.resolve_with(path, false)?)?
            .to_string_lossy()
            .into_owned())
    }

    /// Entry names of a directory, sorted; empty when it does not exist.
    pub fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let dir = self.resolve(path)?;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// In-target paths matching `pattern` (`*` and `?` in any component),
    /// sorted. A pattern without wildcards matches itself if it exists.
    pub fn glob(&self, pattern: &str) -> io::Result<Vec<String>> {
        let mut found = vec![String::new()];
        for comp in split(pattern) {
            let mut next = Vec::new();
            for base in &found {
                if comp.contains(['*', '?', '[']) {
                    let dir = if base.is_empty() { "/" } else { base.as_str() };
                    for name in self.list_dir(dir)? {
                        if (comp.starts_with('.') || !name.starts_with('.'))
                            && wildcard_match(&comp, &name)
                        {
                            next.push(format!("{base}/{name}"));
                        }
                    }
                } else {
                    next.push(format!("{base}/{comp}"));
                }
            }
            found = next;
        }
        let mut out: Vec<String> = found
            .into_iter()
            .map(|p| if p.is_empty() { "/".to_string() } else { p })
            .filter(|p| self.symlink_metadata(p).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The `*{suffix}` files of systemd-style configuration directories
    /// (highest priority first): a name in an earlier directory hides the
    /// same name in later ones; the result is in name order, the order the
    /// files apply in. A directory that is a symlink to another lists once.
    pub fn config_files(&self, dirs: &[&str], suffix: &str) -> io::Result<Vec<String>> {
        let mut by_name = std::collections::BTreeMap::new();
        for dir in dirs {
            for name in self.list_dir(dir)? {
                if name.ends_with(suffix) {
                    by_name
                        .entry(name.clone())
                        .or_insert_with(|| format!("{dir}/{name}"));
                }
            }
        }
        Ok(by_name.into_values().collect())
    }

    /// Run a command on the live host; `None` for offline targets.
    pub fn command(&self, program: &str, args: &[&str]) -> Option<Result<exec::Output>> {
        if !self.live {
            return None;
        }
        Some(
            exec::cmd(program, args)
                .timeout(std::time::Duration::from_secs(30))
                .run_unchecked(),
        )
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// Shell-style matching (`*`, `?`, `[...]`) of one path component or
/// name; a pattern that does not parse matches only itself.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(name),
        Err(_) => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/lib/x")).unwrap();
        std::fs::create_dir_all(r.join("etc/ssh/sshd_config.d")).unwrap();
        std::fs::write(r.join("usr/lib/x/f"), "inside").unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        // An absolute link and a ../ escape must both stay inside the root.
        symlink("/etc/passwd", r.join("etc/abs")).unwrap();
        symlink("../../../../../../etc/hostname", r.join("etc/escape")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/a.conf"), "").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/b.conf"), "").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/.hidden.conf"), "").unwrap();
        let t = Target::root(r).unwrap();
        (d, t)
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (_d, t) = tree();
        assert_eq!(t.read_to_string("/lib/x/f").unwrap(), "inside");
        assert_eq!(
            t.read_to_string("/etc/abs").unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        // The escape resolves to <root>/etc/hostname, which does not exist,
        // even though the host's /etc/hostname does.
        assert!(t.read_to_string("/etc/escape").is_err());
        assert!(t.resolve("/etc/escape").unwrap().starts_with(t.root_dir()));
        assert!(t.symlink_metadata("/lib").unwrap().file_type().is_symlink());
    }

    #[test]
    fn symlink_loops_are_errors() {
        let (d, t) = tree();
        symlink("loop2", d.path().join("etc/loop1")).unwrap();
        symlink("loop1", d.path().join("etc/loop2")).unwrap();
        assert!(t.read_to_string("/etc/loop1").is_err());
    }

    #[test]
    fn glob_skips_hidden_and_sorts() {
        let (_d, t) = tree();
        assert_eq!(
            t.glob("/etc/ssh/sshd_config.d/*.conf").unwrap(),
            vec![
                "/etc/ssh/sshd_config.d/a.conf",
                "/etc/ssh/sshd_config.d/b.conf"
            ]
        );
        assert_eq!(t.glob("/etc/passwd").unwrap(), vec!["/etc/passwd"]);
        assert!(t.glob("/etc/nothing*").unwrap().is_empty());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("ssh_host_*_key", "ssh_host_rsa_key"));
        assert!(!wildcard_match("ssh_host_*_key", "ssh_host_rsa_key.pub"));
        assert!(wildcard_match("*.conf", "a.conf"));
        assert!(wildcard_match("a?c", "abc"));
        assert!(!wildcard_match("a?c", "ac"));
        assert!(wildcard_match("vport[0-9]p1", "vport3p1"));
        assert!(wildcard_match("[", "["));
    }

    #[test]
    fn offline_targets_run_no_commands() {
        let (_d, t) = tree();
        assert!(t.command("true", &[]).is_none());
    }
}

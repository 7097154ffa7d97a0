//! `path`: root's command search path is safe: every `PATH` root's login
//! and sudo can get (login.defs `ENV_SUPATH`, sudoers `secure_path`,
//! /etc/environment, root's shell profiles) holds only absolute
//! directories, no empty entry or `.`, and each directory that exists is
//! owned by root and not writable by group or others. A writable
//! directory on root's PATH lets anyone plant a command root runs.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

/// Where PATH is set for root on Debian and Ubuntu.
const DEFAULT_FILES: &[&str] = &[
    "/etc/login.defs",
    "/etc/sudoers",
    "/etc/environment",
    "/etc/profile",
    "/root/.profile",
    "/root/.bashrc",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathCheck {
    /// Files to read PATH settings from (default: the usual ones).
    #[serde(default)]
    pub files: Vec<String>,
}

/// The PATH values a file sets, with their lines. Shell and sudoers
/// syntax are not parsed in full: an assignment's value is taken up to
/// its closing quote or the first blank or `;`, which is how these files
/// write it. Hand-written for that reason.
pub fn path_settings(text: &str) -> Vec<(usize, String)> {
    let re = regex::Regex::new(
        r#"(?:^|[\s;])(?:export\s+)?(?:ENV_SUPATH\s+|ENV_PATH\s+|secure_path\s*=\s*)?PATH=("([^"]*)"|'([^']*)'|([^\s;"']*))|secure_path\s*=\s*"?([^"\s]*)"?"#,
    )
    .expect("static regex");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.starts_with('#') {
            continue;
        }
        for c in re.captures_iter(line) {
            let v = c
                .get(2)
                .or(c.get(3))
                .or(c.get(4))
                .or(c.get(5))
                .map_or("", |m| m.as_str());
            out.push((i + 1, v.to_string()));
        }
    }
    out
}

impl PathCheck {
    pub fn validate(&self) -> Result<(), String> {
        for f in &self.files {
            if !f.starts_with('/') {
                return Err(format!("`{f}` must be an absolute path"));
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        "root's PATH: absolute, root-owned directories no one else can write".into()
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let files: Vec<&str> = if self.files.is_empty() {
            DEFAULT_FILES.to_vec()
        } else {
            self.files.iter().map(|s| s.as_str()).collect()
        };
        let mut f = Findings::new();
        let mut seen = 0;
        for file in files {
            let text = match t.read_optional(file) {
                Ok(Some(text)) => text,
                Ok(None) => continue,
                Err(e) => return Outcome::error(format!("{file}: {e}")),
            };
            for (line, value) in path_settings(&text) {
                seen += 1;
                let at = format!("{file}:{line}");
                let mut bad = Vec::new();
                for dir in value.split(':') {
                    let dir = dir.replace("$HOME", "/root").replace("${HOME}", "/root");
                    if dir.starts_with('$') {
                        // `$PATH`: the value it extends, judged where set.
                        continue;
                    }
                    if dir.is_empty() || dir == "." || !dir.starts_with('/') {
                        bad.push(format!("{dir:?} is not an absolute directory"));
                        continue;
                    }
                    match t.metadata(&dir) {
                        Ok(md) if md.uid != 0 || md.mode & 0o022 != 0 => {
                            bad.push(format!("{dir} is uid {} mode {:04o}", md.uid, md.mode))
                        }
                        Ok(md) if !md.is_dir() => bad.push(format!("{dir} is not a directory")),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Outcome::error(format!("{dir}: {e}")),
                    }
                }
                if bad.is_empty() {
                    f.ok(format!("{at}: PATH={value}"));
                } else {
                    f.bad(format!("{at}: {}", bad.join("; ")));
                }
            }
        }
        if seen == 0 {
            return Outcome::fail("no PATH setting for root found");
        }
        f.finish()
    }
}

crate::register_kind!("path", PathCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn settings_are_found_in_each_syntax() {
        let s = path_settings(
            "ENV_SUPATH\tPATH=/usr/local/sbin:/usr/sbin\n\
             #PATH=/nope\n\
             Defaults\tsecure_path=\"/usr/sbin:/usr/bin\"\n\
             export PATH=\"$HOME/bin:$PATH\"\n  PATH='/a:/b'; export PATH\n",
        );
        let values: Vec<&str> = s.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            values,
            [
                "/usr/local/sbin:/usr/sbin",
                "/usr/sbin:/usr/bin",
                "$HOME/bin:$PATH",
                "/a:/b"
            ]
        );
    }

    #[test]
    fn writable_and_relative_entries_fail() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in ["etc", "usr/bin", "usr/sbin", "root/bin", "opt/tools"] {
            fs::create_dir_all(r.join(dir)).unwrap();
        }
        fs::write(
            r.join("etc/login.defs"),
            "ENV_SUPATH PATH=/usr/sbin:/usr/bin\n",
        )
        .unwrap();
        fs::write(r.join("root/.profile"), "PATH=\"$HOME/bin:$PATH\"\n").unwrap();
        let c = PathCheck { files: vec![] };
        let t = Target::root(r).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(c.eval(&t).status, Status::Pass, "{:?}", c.eval(&t).evidence);
        }
        fs::set_permissions(r.join("root/bin"), fs::Permissions::from_mode(0o777)).unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.evidence.join("\n").contains("/root/bin is uid"),
            "{:?}",
            o.evidence
        );
        fs::write(r.join("root/.profile"), "PATH=.:/usr/bin\n").unwrap();
        let o = c.eval(&Target::root(r).unwrap());
        assert!(
            o.evidence.join("\n").contains("\".\" is not an absolute"),
            "{:?}",
            o.evidence
        );
        fs::write(r.join("etc/login.defs"), "").unwrap();
        fs::remove_file(r.join("root/.profile")).unwrap();
        assert_eq!(c.eval(&Target::root(r).unwrap()).status, Status::Fail);
    }
}

//! `file`: a file exists or not, its mode is no more permissive than a
//! limit, its owner and group, and what its content holds.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use crate::scan::view::Kind;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCheck {
    /// Absolute path in the target; `*` and `?` match within a component.
    pub path: String,
    /// The path must not exist (no match at all for a pattern).
    #[serde(default)]
    pub absent: bool,
    /// Pass when the path does not exist (the other tests apply if it does).
    #[serde(default)]
    pub optional: bool,
    /// `file`, `dir` or `symlink`.
    pub kind: Option<String>,
    /// Octal; the actual mode may not grant anything beyond it.
    pub mode: Option<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Lines that must be present (compared trimmed).
    #[serde(default)]
    pub lines: Vec<String>,
    /// Regular expressions that must each match a line.
    #[serde(default)]
    pub matches: Vec<String>,
    /// Regular expressions no line may match.
    #[serde(default)]
    pub not_matches: Vec<String>,
    /// No content other than blank lines and `#` comments.
    pub empty: Option<bool>,
    /// Every line that is not blank or a `#` comment is one of these
    /// (an allow list such as /etc/cron.allow).
    pub only_lines: Option<Vec<String>>,
}

impl FileCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("path `{}` must be absolute", self.path));
        }
        if let Some(m) = &self.mode {
            parse_mode(m)?;
        }
        if let Some(k) = &self.kind {
            if !["file", "dir", "symlink", "socket"].contains(&k.as_str()) {
                return Err(format!("kind `{k}` must be file, dir, symlink or socket"));
            }
        }
        for re in self.matches.iter().chain(&self.not_matches) {
            line_regex(re)?;
        }
        if self.absent
            && (self.mode.is_some()
                || self.owner.is_some()
                || !self.lines.is_empty()
                || !self.matches.is_empty())
        {
            return Err("`absent: true` cannot be combined with tests of the file".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut parts = vec![format!("file {}", self.path)];
        if self.absent {
            parts.push("absent".into());
        }
        if let Some(m) = &self.mode {
            parts.push(format!("mode <= {m}"));
        }
        if let Some(o) = &self.owner {
            parts.push(format!("owner {o}"));
        }
        if let Some(g) = &self.group {
            parts.push(format!("group {g}"));
        }
        for l in &self.lines {
            parts.push(format!("has line {l:?}"));
        }
        for m in &self.matches {
            parts.push(format!("matches /{m}/"));
        }
        for m in &self.not_matches {
            parts.push(format!("never matches /{m}/"));
        }
        if self.empty == Some(true) {
            parts.push("empty".into());
        }
        if let Some(only) = &self.only_lines {
            parts.push(format!("only lines [{}]", only.join(", ")));
        }
        parts.join(", ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let paths = match t.glob(&self.path) {
            Ok(p) => p,
            Err(e) => return Outcome::error(format!("{}: {e}", self.path)),
        };
        if self.absent {
            return if paths.is_empty() {
                Outcome::pass(format!("{}: absent", self.path))
            } else {
                Outcome::fail(format!("present: {}", paths.join(", ")))
            };
        }
        if paths.is_empty() {
            return if self.optional {
                Outcome::pass(format!("{}: absent (allowed)", self.path))
            } else {
                Outcome::fail(format!("{}: does not exist", self.path))
            };
        }
        let loaded = match (&self.owner, &self.group) {
            (None, None) => std::sync::Arc::new(Ok(Users::default())),
            _ => Users::load(t),
        };
        let users = match loaded.as_ref() {
            Ok(u) => u,
            Err(e) => return Outcome::error(format!("reading users: {e}")),
        };
        let mut f = Findings::new();
        let mut texts: Vec<(String, String)> = Vec::new();
        for p in &paths {
            if let Some(text) = self.eval_attributes(t, p, users, &mut f) {
                texts.push((p.clone(), text));
            }
        }
        if self.wants_content() {
            self.eval_content(&texts, &mut f);
        }
        f.finish()
    }

    fn wants_content(&self) -> bool {
        !self.lines.is_empty()
            || !self.matches.is_empty()
            || !self.not_matches.is_empty()
            || self.empty.is_some()
            || self.only_lines.is_some()
    }

    /// Mode, owner, group and kind of one path; returns its text when
    /// the content is to be tested.
    fn eval_attributes(
        &self,
        t: &Target,
        path: &str,
        users: &Users,
        f: &mut Findings,
    ) -> Option<String> {
        let md = if self.kind.as_deref() == Some("symlink") {
            t.symlink_metadata(path)
        } else {
            t.metadata(path)
        };
        let md = match md {
            Ok(m) => m,
            Err(e) => {
                f.bad(format!("{path}: {e}"));
                return None;
            }
        };
        // Without a `kind`, the path is a file or a directory: a FIFO,
        // socket or device in its place passes no test of its mode or
        // owner, whatever they are.
        if self.kind.is_none() && !matches!(md.kind, Kind::File | Kind::Dir) {
            f.bad(format!(
                "{path}: is a {}, not a regular file or directory",
                md.kind.name()
            ));
            return None;
        }
        if let Some(k) = &self.kind {
            let actual = match md.kind {
                Kind::Symlink => "symlink",
                Kind::Dir => "dir",
                Kind::Socket => "socket",
                _ => "file",
            };
            f.check(actual == k, format!("{path}: is a {actual}"));
        }
        let mode = md.mode;
        if let Some(limit) = &self.mode {
            let limit = parse_mode(limit).unwrap_or(0);
            let extra = mode & !limit;
            f.check(
                extra == 0,
                if extra == 0 {
                    format!("{path}: mode {mode:04o} (limit {limit:04o})")
                } else {
                    format!("{path}: mode {mode:04o} grants {extra:04o} beyond {limit:04o}")
                },
            );
        }
        if let Some(owner) = &self.owner {
            match users.uid_of(owner) {
                Some(uid) if md.uid == uid => f.ok(format!("{path}: owner {owner}")),
                Some(_) => f.bad(format!(
                    "{path}: owner {}, expected {owner}",
                    users.user_name(md.uid)
                )),
                None => f.bad(format!("{path}: user {owner} does not exist in the target")),
            }
        }
        if let Some(group) = &self.group {
            match users.gid_of(group) {
                Some(gid) if md.gid == gid => f.ok(format!("{path}: group {group}")),
                Some(_) => f.bad(format!(
                    "{path}: group {}, expected {group}",
                    users.group_name(md.gid)
                )),
                None => f.bad(format!(
                    "{path}: group {group} does not exist in the target"
                )),
            }
        }
        if !self.wants_content() {
            if self.kind.is_none()
                && self.mode.is_none()
                && self.owner.is_none()
                && self.group.is_none()
            {
                f.ok(format!("{path}: exists"));
            }
            return None;
        }
        if md.is_dir() {
            f.bad(format!("{path}: is a directory, not a file"));
            return None;
        }
        match t.read_to_string(path) {
            Ok(s) => Some(s),
            Err(e) => {
                f.err(format!("{path}: {e}"));
                None
            }
        }
    }

    /// Content tests over all matched files: a wanted line or pattern must
    /// appear in one of them, a forbidden one in none, and `empty` holds
    /// for each.
    fn eval_content(&self, texts: &[(String, String)], f: &mut Findings) {
        let find = |pred: &dyn Fn(&str) -> bool| {
            texts.iter().find_map(|(p, text)| {
                text.lines()
                    .enumerate()
                    .find(|(_, l)| pred(l))
                    .map(|(i, l)| format!("{p}:{}: {}", i + 1, clip(l)))
            })
        };
        let names = texts
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        for want in &self.lines {
            match find(&|l: &str| l.trim() == want.trim()) {
                Some(at) => f.ok(at),
                None => f.bad(format!("{names}: no line {:?}", want.trim())),
            }
        }
        for re in &self.matches {
            let r = line_regex(re).expect("validated");
            match find(&|l: &str| r.is_match(l)) {
                Some(at) => f.ok(at),
                None => f.bad(format!("{names}: no line matches /{re}/")),
            }
        }
        for re in &self.not_matches {
            let r = line_regex(re).expect("validated");
            match find(&|l: &str| r.is_match(l)) {
                Some(at) => f.bad(format!("{at} (matches /{re}/)")),
                None => f.ok(format!("{names}: no line matches /{re}/")),
            }
        }
        if let Some(only) = &self.only_lines {
            for (p, text) in texts {
                let other = text.lines().enumerate().find(|(_, l)| {
                    let t = l.trim();
                    !t.is_empty() && !t.starts_with('#') && !only.iter().any(|o| o == t)
                });
                match other {
                    None => f.ok(format!("{p}: only [{}]", only.join(", "))),
                    Some((i, l)) => f.bad(format!("{p}:{}: {} is not allowed", i + 1, clip(l))),
                }
            }
        }
        if self.empty == Some(true) {
            for (p, text) in texts {
                let content = text.lines().enumerate().find(|(_, l)| {
                    let t = l.trim();
                    !t.is_empty() && !t.starts_with('#')
                });
                match content {
                    None => f.ok(format!("{p}: no content")),
                    Some((i, l)) => f.bad(format!("{p}:{}: {}", i + 1, clip(l))),
                }
            }
        }
    }
}

fn line_regex(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(re).map_err(|e| format!("invalid regex {re:?}: {e}"))
}

/// Parse an octal mode such as `"0600"` or `"644"`.
pub fn parse_mode(m: &str) -> Result<u32, String> {
    let v = u32::from_str_radix(m.trim(), 8).map_err(|_| format!("mode `{m}` is not octal"))?;
    if v > 0o7777 {
        return Err(format!("mode `{m}` is out of range"));
    }
    Ok(v)
}

pub fn clip(s: &str) -> String {
    let t = s.trim();
    if t.chars().count() > 120 {
        format!("{}…", t.chars().take(120).collect::<String>())
    } else {
        t.to_string()
    }
}

crate::register_kind!("file", FileCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc/ssh")).unwrap();
        fs::create_dir_all(r.join("boot/grub")).unwrap();
        fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(
            r.join("etc/issue"),
            "Unauthorized use is strictly prohibited.\n",
        )
        .unwrap();
        fs::write(r.join("etc/hosts.allow"), "# comment only\n\n").unwrap();
        fs::write(r.join("boot/grub/grub.cfg"), "set superusers=\"root\"\n").unwrap();
        fs::set_permissions(
            r.join("boot/grub/grub.cfg"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        fs::write(r.join("etc/ssh/ssh_host_rsa_key"), "k").unwrap();
        {
            let t = Target::root(r).unwrap();
            (d, t)
        }
    }

    fn check(y: &str) -> FileCheck {
        let c: FileCheck = serde_yaml::from_str(y).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn mode_is_a_limit() {
        let (d, t) = tree();
        let c = check("{ path: /boot/grub/grub.cfg, mode: \"0600\", owner: root, group: root }");
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(o.evidence.iter().any(|e| e.contains("grants 0044")));
        fs::set_permissions(
            d.path().join("boot/grub/grub.cfg"),
            fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Pass);
    }

    #[test]
    fn absent_patterns() {
        let (d, t) = tree();
        let c = check("{ path: /etc/ssh/ssh_host_*_key, absent: true }");
        assert_eq!(c.eval(&t).status, Status::Fail);
        fs::remove_file(d.path().join("etc/ssh/ssh_host_rsa_key")).unwrap();
        assert_eq!(c.eval(&t).status, Status::Pass);
    }

    #[test]
    fn content_tests() {
        let (_d, t) = tree();
        assert_eq!(
            check("{ path: /etc/issue, lines: [\"Unauthorized use is strictly prohibited.\"] }")
                .eval(&t)
                .status,
            Status::Pass
        );
        assert_eq!(
            check("{ path: /etc/issue, not_matches: ['\\\\[mrsv]', '(?i)debian'] }")
                .eval(&t)
                .status,
            Status::Pass
        );
        assert_eq!(
            check("{ path: /etc/issue, matches: ['^Welcome'] }")
                .eval(&t)
                .status,
            Status::Fail
        );
        assert_eq!(
            check("{ path: /etc/hosts.allow, empty: true }")
                .eval(&t)
                .status,
            Status::Pass
        );
        assert_eq!(
            check("{ path: /etc/issue, empty: true }").eval(&t).status,
            Status::Fail
        );
        assert_eq!(
            check("{ path: /etc/motd, empty: true }").eval(&t).status,
            Status::Fail
        );
        assert_eq!(
            check("{ path: /etc/motd, empty: true, optional: true }")
                .eval(&t)
                .status,
            Status::Pass
        );
    }

    #[test]
    fn owner_must_exist_in_target() {
        let (_d, t) = tree();
        let o = check("{ path: /etc/issue, owner: nosuchuser }").eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("does not exist"));
    }

    #[test]
    fn invalid_checks_are_rejected() {
        let c: FileCheck = serde_yaml::from_str("{ path: etc/x }").unwrap();
        assert!(c.validate().is_err());
        let c: FileCheck = serde_yaml::from_str("{ path: /x, mode: \"0999\" }").unwrap();
        assert!(c.validate().is_err());
        assert!(serde_yaml::from_str::<FileCheck>("{ path: /x, mdoe: \"0600\" }").is_err());
    }
}

//! `accounts`: properties of the account databases (passwd, shadow,
//! group) and of the users' homes: no empty passwords, no password hashes
//! in a shipped image, only root with uid 0, root's gid 0, system accounts
//! without a login shell, no duplicate names or ids, no groups missing,
//! no legacy NIS `+` entries, who may be in a group, and homes that exist,
//! belong to their users and hold no writable or remote-trust dot files.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use serde::Deserialize;

/// Accounts that legitimately carry a special shell.
const SHELL_EXEMPT: &[&str] = &["root", "sync", "shutdown", "halt"];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsCheck {
    #[serde(default)]
    pub no_empty_passwords: bool,
    /// Every account is locked or passwordless-locked (`*`, `!`): an image
    /// ships no password.
    #[serde(default)]
    pub no_password_hashes: bool,
    #[serde(default)]
    pub only_root_uid0: bool,
    #[serde(default)]
    pub root_gid0: bool,
    #[serde(default)]
    pub system_accounts_nologin: bool,
    /// No two users or groups share a name or an id.
    #[serde(default)]
    pub unique: bool,
    /// Every user's primary group exists in /etc/group.
    #[serde(default)]
    pub groups_exist: bool,
    /// No `+`/`-` NIS compatibility entries in passwd, shadow or group.
    #[serde(default)]
    pub no_nis_entries: bool,
    /// Group -> the only users allowed in it (as members or by primary
    /// group); an empty list: nobody.
    #[serde(default)]
    pub group_members: std::collections::BTreeMap<String, Vec<String>>,
    /// Users with a login shell have a home directory they own, not
    /// writable by group or others.
    #[serde(default)]
    pub homes: bool,
    /// Their dot files are not writable by group or others, and none is
    /// `.rhosts`, `.netrc` or `.forward`.
    #[serde(default)]
    pub dot_files: bool,
}

/// Remote-trust and mail-forwarding files no home may hold.
const FORBIDDEN_DOT_FILES: &[&str] = &[".rhosts", ".netrc", ".forward", ".shosts"];

fn has_login_shell(u: &crate::scan::users::PasswdEntry) -> bool {
    !(u.shell.ends_with("/nologin") || u.shell.ends_with("/false") || u.shell.ends_with("/sync"))
}

fn is_locked(field: &str) -> bool {
    field.starts_with('!') || field.starts_with('*')
}

impl AccountsCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.no_empty_passwords
            || self.no_password_hashes
            || self.only_root_uid0
            || self.root_gid0
            || self.system_accounts_nologin
            || self.unique
            || self.groups_exist
            || self.no_nis_entries
            || !self.group_members.is_empty()
            || self.homes
            || self.dot_files)
        {
            return Err("enable at least one rule".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if self.no_empty_passwords {
            p.push("no empty passwords");
        }
        if self.no_password_hashes {
            p.push("no password set on any account");
        }
        if self.only_root_uid0 {
            p.push("only root has uid 0");
        }
        if self.root_gid0 {
            p.push("root's gid is 0");
        }
        if self.system_accounts_nologin {
            p.push("system accounts cannot log in");
        }
        if self.unique {
            p.push("user and group names and ids are unique");
        }
        if self.groups_exist {
            p.push("every primary group exists");
        }
        if self.no_nis_entries {
            p.push("no NIS `+` entries");
        }
        let members: Vec<String> = self
            .group_members
            .iter()
            .map(|(g, m)| format!("group {g} holds only [{}]", m.join(", ")))
            .collect();
        p.extend(members.iter().map(|s| s.as_str()));
        if self.homes {
            p.push("login users own their private homes");
        }
        if self.dot_files {
            p.push("dot files private, no .rhosts/.netrc/.forward");
        }
        p.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let loaded = Users::load(t);
        let users = match loaded.as_ref() {
            Ok(u) => u,
            Err(e) => return Outcome::error(format!("reading users: {e}")),
        };
        let mut f = Findings::new();
        if self.no_empty_passwords || self.no_password_hashes {
            let shadow = match t.read_optional("/etc/shadow") {
                Ok(Some(s)) => s,
                Ok(None) => return Outcome::fail("/etc/shadow does not exist"),
                Err(e) => return Outcome::error(format!("/etc/shadow: {e}")),
            };
            let mut empty = Vec::new();
            let mut hashed = Vec::new();
            for (i, l) in shadow.lines().enumerate() {
                let fields: Vec<&str> = l.split(':').collect();
                if fields.len() < 2 {
                    continue;
                }
                if fields[1].is_empty() {
                    empty.push(format!("/etc/shadow:{}: {}", i + 1, fields[0]));
                } else if !is_locked(fields[1]) {
                    hashed.push(format!("/etc/shadow:{}: {}", i + 1, fields[0]));
                }
            }
            if self.no_empty_passwords {
                f.none_of(&empty, "no account has an empty password", "empty password");
            }
            if self.no_password_hashes {
                f.none_of(
                    &hashed,
                    "every account is locked (no password hash)",
                    "password hash set",
                );
            }
        }
        if self.only_root_uid0 {
            let zero: Vec<String> = users
                .users
                .iter()
                .filter(|u| u.uid == 0)
                .map(|u| u.name.clone())
                .collect();
            f.check(zero == ["root"], format!("uid 0: {}", zero.join(", ")));
        }
        if self.root_gid0 {
            match users.users.iter().find(|u| u.name == "root") {
                Some(r) => f.check(
                    r.gid == 0,
                    format!("/etc/passwd:{}: root gid {}", r.line, r.gid),
                ),
                None => f.bad("no root account"),
            }
        }
        if self.system_accounts_nologin {
            let bad: Vec<String> = users
                .users
                .iter()
                .filter(|u| u.uid < 1000 && !SHELL_EXEMPT.contains(&u.name.as_str()))
                .filter(|u| !(u.shell.ends_with("/nologin") || u.shell.ends_with("/false")))
                .map(|u| format!("/etc/passwd:{}: {} ({})", u.line, u.name, u.shell))
                .collect();
            f.none_of(&bad, "system accounts have no login shell", "login shell");
        }
        if self.unique {
            let mut dups = Vec::new();
            let mut seen = std::collections::BTreeMap::new();
            for u in &users.users {
                for key in [format!("user {}", u.name), format!("uid {}", u.uid)] {
                    if let Some(first) = seen.insert(key.clone(), u.line) {
                        dups.push(format!("{key} (/etc/passwd:{first} and :{})", u.line));
                    }
                }
            }
            let mut gids = std::collections::BTreeMap::new();
            for (name, (gid, _)) in &users.groups {
                if let Some(other) = gids.insert(*gid, name) {
                    dups.push(format!("gid {gid} ({other} and {name})"));
                }
            }
            dups.extend(users.duplicate_groups.iter().map(|g| format!("group {g}")));
            let ok = format!(
                "{} users and {} groups, no duplicates",
                users.users.len(),
                users.groups.len()
            );
            f.none_of(&dups, ok, "duplicates");
        }
        if self.groups_exist {
            let missing: Vec<String> = users
                .users
                .iter()
                .filter(|u| !users.has_gid(u.gid))
                .map(|u| format!("/etc/passwd:{}: {} gid {}", u.line, u.name, u.gid))
                .collect();
            f.none_of(&missing, "every primary group exists", "no such group");
        }
        if self.no_nis_entries {
            for file in ["/etc/passwd", "/etc/shadow", "/etc/group"] {
                match t.read_optional(file) {
                    Ok(text) => {
                        let bad: Vec<String> = text
                            .unwrap_or_default()
                            .lines()
                            .enumerate()
                            .filter(|(_, l)| l.starts_with('+') || l.starts_with('-'))
                            .map(|(i, _)| format!("{file}:{}", i + 1))
                            .collect();
                        f.none_of(&bad, format!("{file}: no NIS entries"), "NIS entry");
                    }
                    Err(e) => return Outcome::error(format!("{file}: {e}")),
                }
            }
        }
        for (group, allowed) in &self.group_members {
            let Some((gid, members)) = users.groups.get(group) else {
                f.ok(format!("no group {group}"));
                continue;
            };
            let mut inside: Vec<String> = members.clone();
            inside.extend(
                users
                    .users
                    .iter()
                    .filter(|u| u.gid == *gid)
                    .map(|u| u.name.clone()),
            );
            let extra: Vec<&String> = inside.iter().filter(|m| !allowed.contains(m)).collect();
            f.check(
                extra.is_empty(),
                if extra.is_empty() {
                    format!("group {group}: [{}]", inside.join(", "))
                } else {
                    format!(
                        "group {group} holds {}",
                        extra
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            );
        }
        if self.homes || self.dot_files {
            for u in users.users.iter().filter(|u| has_login_shell(u)) {
                let md = match t.metadata(&u.home) {
                    Ok(md) => md,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if self.homes {
                            f.bad(format!("{}: home {} does not exist", u.name, u.home));
                        }
                        continue;
                    }
                    Err(e) => return Outcome::error(format!("{}: {e}", u.home)),
                };
                if self.homes {
                    let ok = md.is_dir() && md.uid == u.uid && md.mode & 0o022 == 0;
                    f.check(
                        ok,
                        format!(
                            "{}: home {} {} uid {} mode {:04o}",
                            u.name,
                            u.home,
                            if md.is_dir() { "dir" } else { "not a dir" },
                            md.uid,
                            md.mode
                        ),
                    );
                }
                if self.dot_files && md.is_dir() {
                    let entries = match t.read_dir(&u.home) {
                        Ok(e) => e,
                        Err(e) => return Outcome::error(format!("{}: {e}", u.home)),
                    };
                    let mut bad = Vec::new();
                    for (name, m) in entries.iter().filter(|(n, _)| n.starts_with('.')) {
                        let path = format!("{}/{name}", u.home.trim_end_matches('/'));
                        if FORBIDDEN_DOT_FILES.contains(&name.as_str()) {
                            bad.push(format!("{path} exists"));
                        } else if !m.is_symlink() && m.mode & 0o022 != 0 {
                            bad.push(format!("{path} mode {:04o}", m.mode));
                        }
                    }
                    f.none_of(&bad, format!("{}: dot files private", u.home), "dot files");
                }
            }
        }
        f.finish()
    }
}

crate::register_kind!("accounts", AccountsCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    #[test]
    fn shadow_rules() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/usr/sbin/nologin\n",
        )
        .unwrap();
        fs::write(d.path().join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(
            d.path().join("etc/shadow"),
            "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let c = AccountsCheck {
            no_empty_passwords: true,
            no_password_hashes: true,
            only_root_uid0: true,
            root_gid0: true,
            system_accounts_nologin: true,
            ..Default::default()
        };
        assert_eq!(c.eval(&t).status, Status::Pass);
        fs::write(
            d.path().join("etc/shadow"),
            "root:$6$abc$def:19000::::::\ndaemon::19000::::::\n",
        )
        .unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        let text = o.evidence.join("\n");
        assert!(
            text.contains("empty password: /etc/shadow:2: daemon"),
            "{text}"
        );
        assert!(
            text.contains("password hash set: /etc/shadow:1: root"),
            "{text}"
        );
    }
}

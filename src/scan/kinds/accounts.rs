//! `accounts`: properties of the account databases (passwd, shadow,
//! group): no empty passwords, no password hashes in a shipped image, only
//! root with uid 0, root's gid 0, system accounts without a login shell.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use crate::scan::users::Users;
use serde::Deserialize;

/// Accounts that legitimately carry a special shell.
const SHELL_EXEMPT: &[&str] = &["root", "sync", "shutdown", "halt"];

#[derive(Debug, Clone, Deserialize)]
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
            || self.system_accounts_nologin)
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
                f.check(
                    empty.is_empty(),
                    if empty.is_empty() {
                        "no account has an empty password".into()
                    } else {
                        format!("empty password: {}", empty.join(", "))
                    },
                );
            }
            if self.no_password_hashes {
                f.check(
                    hashed.is_empty(),
                    if hashed.is_empty() {
                        "every account is locked (no password hash)".into()
                    } else {
                        format!("password hash set: {}", hashed.join(", "))
                    },
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
            f.check(
                bad.is_empty(),
                if bad.is_empty() {
                    "system accounts have no login shell".into()
                } else {
                    format!("login shell: {}", bad.join(", "))
                },
            );
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

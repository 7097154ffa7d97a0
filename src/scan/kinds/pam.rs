//! `pam`: a module in a service's PAM stack, as PAM reads it: the stack of
//! `/etc/pam.d/SERVICE` (or `/usr/lib/pam.d/SERVICE`) with its
//! `@include`s expanded in place, for one management group (`auth`,
//! `account`, `password`, `session`). The module must be there, with the
//! control flags, arguments and `key=value` settings asked for, and before
//! another module when `before` says so.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

const PAM_DIRS: &[&str] = &["/etc/pam.d", "/usr/lib/pam.d"];
/// Deeper nesting than any distribution uses: an include loop.
const MAX_DEPTH: usize = 8;
const TYPES: &[&str] = &["auth", "account", "password", "session"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PamCheck {
    /// `su`, `common-password`, `sshd`.
    pub service: String,
    /// `auth`, `account`, `password` or `session`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pam_wheel.so` (a path's last component is compared).
    pub module: String,
    /// Control flags accepted (`required`, `requisite`, `[...]`; empty:
    /// any).
    #[serde(default)]
    pub control: Vec<String>,
    /// Arguments that must all be present (`use_uid`).
    #[serde(default)]
    pub args: Vec<String>,
    /// `key=value` arguments and what their values must be
    /// (`remember: { min: 20 }`).
    #[serde(default, deserialize_with = "deserialize_expect_map")]
    pub settings: Vec<(String, Expect)>,
    /// A module this one must come before in the stack (`pam_unix.so`).
    pub before: Option<String>,
}

/// One rule of an expanded stack.
#[derive(Debug, Clone, PartialEq)]
pub struct PamLine {
    /// `/etc/pam.d/common-password:25`
    pub at: String,
    pub kind: String,
    pub control: String,
    pub module: String,
    pub args: Vec<String>,
}

/// Split a PAM line into words; a bracketed control (`[a=b c=d]`) and a
/// bracketed argument are one word each. Hand-written: no crate parses
/// pam.d syntax, and it is a few lines.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for c in line.chars() {
        match c {
            '[' => {
                depth += 1;
                cur.push(c);
            }
            ']' if depth > 0 => {
                depth -= 1;
                cur.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn module_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The stack of `service` for `kind`, includes expanded.
pub fn stack(t: &Target, service: &str, kind: &str) -> Result<Vec<PamLine>, String> {
    let mut out = Vec::new();
    expand(t, service, kind, 0, &mut out)?;
    Ok(out)
}

fn expand(
    t: &Target,
    service: &str,
    kind: &str,
    depth: usize,
    out: &mut Vec<PamLine>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "includes nested deeper than {MAX_DEPTH} at {service}"
        ));
    }
    if service.contains('/') || service.starts_with('.') {
        return Err(format!("`{service}` is not a PAM service name"));
    }
    let mut found = None;
    for dir in PAM_DIRS {
        let path = format!("{dir}/{service}");
        match t.read_optional(&path) {
            Ok(Some(text)) => {
                found = Some((path, text));
                break;
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    let Some((path, text)) = found else {
        return Err(format!(
            "no PAM service {service} in {}",
            PAM_DIRS.join(" or ")
        ));
    };
    // Backslash-newline continues a line.
    let joined = text.replace("\\\n", " ");
    for (i, raw) in joined.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let w = words(line);
        if w[0] == "@include" {
            if let Some(inc) = w.get(1) {
                expand(t, inc, kind, depth + 1, out)?;
            }
            continue;
        }
        let ty = w[0].trim_start_matches('-');
        if ty != kind || w.len() < 3 {
            continue;
        }
        if w[1] == "include" || w[1] == "substack" {
            expand(t, &w[2], kind, depth + 1, out)?;
            continue;
        }
        out.push(PamLine {
            at: format!("{path}:{}", i + 1),
            kind: ty.to_string(),
            control: w[1].clone(),
            module: module_name(&w[2]).to_string(),
            args: w[3..].to_vec(),
        });
    }
    Ok(())
}

impl PamCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !TYPES.contains(&self.kind.as_str()) {
            return Err(format!("type `{}`: one of {}", self.kind, TYPES.join(", ")));
        }
        if self.service.contains('/') {
            return Err(format!("service `{}` is a name, not a path", self.service));
        }
        for (_, e) in &self.settings {
            e.validate()?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut s = format!("PAM {} {}: {}", self.service, self.kind, self.module);
        if !self.control.is_empty() {
            s.push_str(&format!(" ({})", self.control.join("|")));
        }
        for a in &self.args {
            s.push_str(&format!(" {a}"));
        }
        for (k, e) in &self.settings {
            s.push_str(&format!(" {k} {}", e.describe()));
        }
        if let Some(b) = &self.before {
            s.push_str(&format!(", before {b}"));
        }
        s
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let key = format!("pam {} {}", self.service, self.kind);
        let loaded = t.fact(&key, || stack(t, &self.service, &self.kind));
        let lines = match loaded.as_ref() {
            Ok(l) => l,
            Err(e) if e.starts_with("no PAM service") => return Outcome::fail(e.clone()),
            Err(e) => return Outcome::error(e.clone()),
        };
        let Some(pos) = lines.iter().position(|l| l.module == self.module) else {
            return Outcome::fail(format!(
                "{} is not in the {} stack of {} ({} rules)",
                self.module,
                self.kind,
                self.service,
                lines.len()
            ));
        };
        let l = &lines[pos];
        let mut f = Findings::new();
        // The module is in the stack: that alone is part of the pass.
        f.ok(format!(
            "{}: {} {} {} {}",
            l.at,
            l.kind,
            l.control,
            l.module,
            l.args.join(" ")
        ));
        if !self.control.is_empty() {
            f.check(
                self.control.contains(&l.control),
                format!("control {} (wanted {})", l.control, self.control.join("|")),
            );
        }
        for a in &self.args {
            f.check(
                l.args.contains(a),
                format!(
                    "argument {a}: {}",
                    if l.args.contains(a) {
                        "present"
                    } else {
                        "missing"
                    }
                ),
            );
        }
        for (k, e) in &self.settings {
            let value = l
                .args
                .iter()
                .rev()
                .find_map(|a| a.strip_prefix(&format!("{k}=")));
            match e.test(value) {
                Ok(()) => f.ok(format!("{k}={}", value.unwrap_or("(not set)"))),
                Err(why) => f.bad(format!("{k} {why}")),
            }
        }
        if let Some(b) = &self.before {
            match lines.iter().position(|x| &x.module == b) {
                Some(p) if p < pos => {
                    f.bad(format!("{} comes after {b} ({})", self.module, lines[p].at))
                }
                Some(p) => f.ok(format!("before {b} ({})", lines[p].at)),
                None => f.ok(format!("{b} is not in the stack")),
            }
        }
        f.finish()
    }
}

crate::register_kind!("pam", PamCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    fn check(yaml: &str) -> PamCheck {
        let c: PamCheck = serde_yaml::from_str(yaml).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn stacks_expand_includes_and_judge_the_module() {
        let d = tempfile::tempdir().unwrap();
        let pd = d.path().join("etc/pam.d");
        fs::create_dir_all(&pd).unwrap();
        // Debian 12's common-password as pam-auth-update writes it, with
        // pwquality and pwhistory profiles.
        fs::write(
            pd.join("common-password"),
            "# here are the per-package modules (the \"Primary\" block)\n\
             password\trequisite\t\t\tpam_pwquality.so retry=3\n\
             password\trequired\t\t\tpam_pwhistory.so remember=24 use_authtok\n\
             password\t[success=1 default=ignore]\tpam_unix.so obscure use_authtok try_first_pass yescrypt\n\
             password\trequisite\t\t\tpam_deny.so\n\
             password\trequired\t\t\tpam_permit.so\n",
        )
        .unwrap();
        fs::write(pd.join("passwd"), "@include common-password\n").unwrap();
        fs::write(
            pd.join("su"),
            "auth       sufficient pam_rootok.so\n# auth       required   pam_wheel.so\n\
             auth       required   pam_wheel.so \\\n  use_uid\n@include common-auth\n",
        )
        .unwrap();
        fs::write(
            pd.join("common-auth"),
            "auth [success=1 default=ignore] pam_unix.so nullok\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let hist = check(
            "{ service: passwd, type: password, module: pam_pwhistory.so, control: [required, requisite], settings: { remember: { min: 20 } }, before: pam_unix.so }",
        );
        let o = hist.eval(&t);
        assert_eq!(o.status, Status::Pass, "{:?}", o.evidence);
        assert!(
            o.evidence[0].contains("/etc/pam.d/common-password:3"),
            "{:?}",
            o.evidence
        );
        let wheel = check("{ service: su, type: auth, module: pam_wheel.so, args: [use_uid] }");
        assert_eq!(
            wheel.eval(&t).status,
            Status::Pass,
            "{:?}",
            wheel.eval(&t).evidence
        );
        // Presence alone is a pass, not "not applicable".
        let unix = check("{ service: passwd, type: password, module: pam_unix.so }");
        assert_eq!(unix.eval(&t).status, Status::Pass);
        let s = stack(&t, "su", "auth").unwrap();
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[2].control, "[success=1 default=ignore]");
        // Weakened: fewer remembered passwords, the module after pam_unix,
        // an argument missing, a service without the module.
        let weak = hist.clone();
        fs::write(
            pd.join("common-password"),
            "password [success=1 default=ignore] pam_unix.so\npassword required pam_pwhistory.so remember=5\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let o = weak.eval(&t);
        assert_eq!(o.status, Status::Fail);
        let text = o.evidence.join("\n");
        assert!(text.contains("remember"), "{text}");
        assert!(text.contains("comes after pam_unix.so"), "{text}");
        let gone = check(
            "{ service: su, type: auth, module: pam_wheel.so, args: [use_uid, group=sugroup] }",
        );
        assert_eq!(gone.eval(&t).status, Status::Fail);
        let none = check("{ service: login, type: auth, module: pam_securetty.so }");
        assert_eq!(none.eval(&t).status, Status::Fail);
        // An include loop is an error, not a pass or a hang.
        fs::write(pd.join("loop"), "@include loop\n").unwrap();
        let l = check("{ service: loop, type: auth, module: pam_unix.so }");
        assert_eq!(
            l.eval(&Target::root(d.path()).unwrap()).status,
            Status::Error
        );
    }
}

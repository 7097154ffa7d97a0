//! `audit_rule`: audit rules, compared in a normalized form (syscall lists
//! as sets, `-k k` = `-F key=k`, `auid!=4294967295` = `auid!=-1` =
//! `auid!=unset`, watch paths without a trailing slash). Offline: the files
//! augenrules compiles (/etc/audit/rules.d/*.rules); live: `auditctl -l`.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRuleCheck {
    /// A rule that must be loaded (a rule that covers at least as much
    /// counts: more permissions on a watch, more syscalls on a rule).
    pub rule: Option<String>,
    /// At least this many watch and syscall rules.
    pub min_count: Option<usize>,
    /// The configuration is locked (`-e 2`) until reboot.
    pub immutable: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Watch {
        path: String,
        perms: BTreeSet<char>,
        key: Option<String>,
    },
    Syscall {
        list: String,
        action: String,
        arch: Option<String>,
        syscalls: BTreeSet<String>,
        fields: BTreeSet<String>,
        key: Option<String>,
    },
    /// -e, -b, -f, -D, --backlog_wait_time ...
    Control(String, String),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Watch { path, perms, key } => {
                write!(f, "-w {path} -p {}", perms.iter().collect::<String>())?;
                if let Some(k) = key {
                    write!(f, " -k {k}")?;
                }
                Ok(())
            }
            Rule::Syscall {
                list,
                action,
                arch,
                syscalls,
                fields,
                key,
            } => {
                write!(f, "-a {action},{list}")?;
                if let Some(a) = arch {
                    write!(f, " -F arch={a}")?;
                }
                if !syscalls.is_empty() {
                    write!(
                        f,
                        " -S {}",
                        syscalls.iter().cloned().collect::<Vec<_>>().join(",")
                    )?;
                }
                for fl in fields {
                    match fl.strip_prefix("C:") {
                        Some(c) => write!(f, " -C {c}")?,
                        None => write!(f, " -F {fl}")?,
                    }
                }
                if let Some(k) = key {
                    write!(f, " -k {k}")?;
                }
                Ok(())
            }
            Rule::Control(flag, v) => write!(f, "{flag} {v}"),
        }
    }
}

const LISTS: &[&str] = &[
    "exit",
    "task",
    "user",
    "exclude",
    "filesystem",
    "io_uring",
    "entry",
];

fn normalize_field(f: &str) -> Result<(String, String, String), String> {
    let ops = ["!=", "<=", ">=", "&=", "=", "<", ">", "&"];
    for op in ops {
        if let Some(idx) = f.find(op) {
            let (name, value) = (&f[..idx], &f[idx + op.len()..]);
            let value = match (name, value) {
                ("auid" | "loginuid", "4294967295" | "-1" | "unset") => "unset".to_string(),
                _ => value.to_string(),
            };
            return Ok((name.to_string(), op.to_string(), value));
        }
    }
    Err(format!("field `{f}` has no operator"))
}

/// Parse one rule line (a rules.d line or an `auditctl -l` line).
pub fn parse_rule(line: &str) -> Result<Option<Rule>, String> {
    let l = line.trim();
    if l.is_empty() || l.starts_with('#') || l == "No rules" {
        return Ok(None);
    }
    let toks: Vec<&str> = l.split_whitespace().collect();
    let mut i = 0;
    let mut watch: Option<String> = None;
    let mut perms = BTreeSet::new();
    let mut list_action: Option<(String, String)> = None;
    let mut arch = None;
    let mut syscalls = BTreeSet::new();
    let mut fields = BTreeSet::new();
    let mut key = None;
    let next = |i: &mut usize| -> Result<String, String> {
        *i += 1;
        toks.get(*i)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("`{}` needs a value in: {l}", toks[*i - 1]))
    };
    while i < toks.len() {
        match toks[i] {
            "-w" => watch = Some(next(&mut i)?),
            "-p" => perms.extend(next(&mut i)?.chars()),
            "-k" => key = Some(next(&mut i)?),
            "-a" | "-A" => {
                let v = next(&mut i)?;
                let (a, b) = v
                    .split_once(',')
                    .ok_or_else(|| format!("bad -a value `{v}`"))?;
                let (list, action) = if LISTS.contains(&a) { (a, b) } else { (b, a) };
                list_action = Some((list.to_string(), action.to_string()));
            }
            "-S" => {
                for s in next(&mut i)?.split(',') {
                    if s != "all" {
                        syscalls.insert(s.to_string());
                    }
                }
            }
            "-F" => {
                let (name, op, value) = normalize_field(&next(&mut i)?)?;
                match (name.as_str(), op.as_str()) {
                    ("arch", "=") => arch = Some(value),
                    ("key", "=") => key = Some(value),
                    ("dir", "=") if watch.is_none() => {
                        fields.insert(format!("dir={}", value.trim_end_matches('/')));
                    }
                    _ => {
                        fields.insert(format!("{name}{op}{value}"));
                    }
                }
            }
            "-C" => {
                fields.insert(format!("C:{}", next(&mut i)?));
            }
            flag @ ("-e" | "-b" | "-f" | "-r" | "--backlog_wait_time" | "--reset-lost") => {
                let v = if flag == "--reset-lost" {
                    String::new()
                } else {
                    next(&mut i)?
                };
                return Ok(Some(Rule::Control(flag.to_string(), v)));
            }
            flag @ ("-D" | "--loginuid-immutable" | "-c" | "-i") => {
                return Ok(Some(Rule::Control(flag.to_string(), String::new())));
            }
            other => return Err(format!("unknown audit rule token `{other}` in: {l}")),
        }
        i += 1;
    }
    if let Some(path) = watch {
        let path = if path.len() > 1 {
            path.trim_end_matches('/').to_string()
        } else {
            path
        };
        if perms.is_empty() {
            perms.extend("rwxa".chars());
        }
        return Ok(Some(Rule::Watch { path, perms, key }));
    }
    let (list, action) = list_action.ok_or_else(|| format!("neither -w nor -a in: {l}"))?;
    Ok(Some(Rule::Syscall {
        list,
        action,
        arch,
        syscalls,
        fields,
        key,
    }))
}

/// Whether `have` audits at least what `want` asks for.
pub fn covers(have: &Rule, want: &Rule) -> bool {
    match (have, want) {
        (
            Rule::Watch {
                path: p1,
                perms: r1,
                ..
            },
            Rule::Watch {
                path: p2,
                perms: r2,
                ..
            },
        ) => p1 == p2 && r2.is_subset(r1),
        (
            Rule::Syscall {
                list: l1,
                action: a1,
                arch: x1,
                syscalls: s1,
                fields: f1,
                ..
            },
            Rule::Syscall {
                list: l2,
                action: a2,
                arch: x2,
                syscalls: s2,
                fields: f2,
                ..
            },
        ) => l1 == l2 && a1 == a2 && x1 == x2 && f1 == f2 && (s1.is_empty() || s2.is_subset(s1)),
        // auditctl -l lists directory watches given as `-w dir/` with
        // `-F dir=`; a syscall rule on dir/perm covers such a watch.
        (Rule::Syscall { fields, .. }, Rule::Watch { path, perms, .. }) => {
            fields.contains(&format!("dir={path}"))
                && perms.iter().all(|p| {
                    fields
                        .iter()
                        .any(|f| f.starts_with("perm=") && f.contains(*p))
                })
        }
        _ => false,
    }
}

/// The rules of a target: (origin, rule) in load order.
pub fn load_rules(t: &Target) -> Result<Vec<(String, Rule)>, String> {
    let mut out = Vec::new();
    if t.is_live() {
        for l in t.stdout("auditctl", &["-l"])?.lines() {
            if let Some(r) = parse_rule(l)? {
                out.push(("auditctl -l".to_string(), r));
            }
        }
        return Ok(out);
    }
    let mut files: Vec<String> = t
        .list_dir("/etc/audit/rules.d")
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|n| n.ends_with(".rules"))
        .map(|n| format!("/etc/audit/rules.d/{n}"))
        .collect();
    if files.is_empty() {
        files.push("/etc/audit/audit.rules".to_string());
    }
    for f in files {
        let Some(text) = t.read_optional(&f).map_err(|e| format!("{f}: {e}"))? else {
            continue;
        };
        for (i, l) in text.lines().enumerate() {
            if let Some(r) = parse_rule(l).map_err(|e| format!("{f}:{}: {e}", i + 1))? {
                out.push((format!("{f}:{}", i + 1), r));
            }
        }
    }
    Ok(out)
}

impl AuditRuleCheck {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = &self.rule {
            match parse_rule(r)? {
                Some(Rule::Control(..)) | None => {
                    return Err(format!("`{r}` is not a watch or syscall rule"));
                }
                Some(_) => {}
            }
        }
        if self.rule.is_none() && self.min_count.is_none() && self.immutable.is_none() {
            return Err("give `rule`, `min_count` or `immutable`".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.rule {
            parts.push(format!("audit rule {r}"));
        }
        if let Some(n) = self.min_count {
            parts.push(format!("at least {n} audit rules"));
        }
        if self.immutable == Some(true) {
            parts.push("audit configuration immutable (-e 2)".into());
        }
        parts.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        if t.is_live() && t.find_program("auditctl").is_none() {
            return Outcome::fail("auditd is not installed (no auditctl)");
        }
        let loaded = t.fact("audit rules", || load_rules(t));
        let rules = match loaded.as_ref() {
            Ok(r) => r,
            Err(e) => return Outcome::error(e.clone()),
        };
        let mut f = Findings::new();
        if let Some(text) = &self.rule {
            let want = parse_rule(text).ok().flatten().expect("validated");
            match rules.iter().find(|(_, r)| covers(r, &want)) {
                Some((origin, r)) => f.ok(format!("{origin}: {r}")),
                None => f.bad(format!("no rule covers: {want}")),
            }
        }
        if let Some(min) = self.min_count {
            let n = rules
                .iter()
                .filter(|(_, r)| !matches!(r, Rule::Control(..)))
                .count();
            f.check(
                n >= min,
                format!("{n} audit rules (at least {min} required)"),
            );
        }
        if let Some(want) = self.immutable {
            let mode = if t.is_live() {
                match t.command("auditctl", &["-s"]) {
                    Some(Ok(o)) => o.stdout_str().lines().find_map(|l| {
                        l.strip_prefix("enabled ")
                            .map(|v| (v.trim().to_string(), "auditctl -s".to_string()))
                    }),
                    Some(Err(e)) => {
                        f.err(format!("auditctl -s: {e:#}"));
                        None
                    }
                    None => None,
                }
            } else {
                rules.iter().rev().find_map(|(o, r)| match r {
                    Rule::Control(flag, v) if flag == "-e" => Some((v.clone(), o.clone())),
                    _ => None,
                })
            };
            match mode {
                Some((v, origin)) => f.check((v == "2") == want, format!("{origin}: enabled {v}")),
                None => f.check(!want, "no -e setting (not immutable)".to_string()),
            }
        }
        f.finish()
    }
}

crate::register_kind!("audit_rule", AuditRuleCheck);

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Rule {
        parse_rule(s).unwrap().unwrap()
    }

    #[test]
    fn file_form_and_auditctl_form_are_equal() {
        // As written in rules.d, and as `auditctl -l` prints it.
        let written = r("-a always,exit -F arch=b64 -S adjtimex -S settimeofday -k time-change");
        let listed = r("-a always,exit -F arch=b64 -S settimeofday,adjtimex -F key=time-change");
        assert_eq!(written, listed);
        let w =
            r("-a always,exit -F arch=b64 -S unlink -F auid>=1000 -F auid!=4294967295 -k delete");
        let l = r("-a always,exit -F arch=b64 -S unlink -F auid>=1000 -F auid!=-1 -F key=delete");
        assert_eq!(w, l);
        assert_eq!(r("-a exit,always -S mount"), r("-a always,exit -S mount"));
        assert_eq!(
            r("-w /etc/sudoers.d/ -p wa -k scope"),
            r("-w /etc/sudoers.d -p aw -k scope")
        );
        let path_rule = r(
            "-a always,exit -F path=/usr/bin/su -F perm=x -F auid>=1000 -F auid!=unset -k privileged",
        );
        let listed = r(
            "-a always,exit -S all -F path=/usr/bin/su -F perm=x -F auid>=1000 -F auid!=-1 -F key=privileged",
        );
        assert!(covers(&listed, &path_rule));
    }

    #[test]
    fn coverage_is_a_superset_test() {
        let want = r("-w /etc/passwd -p wa -k identity");
        assert!(covers(&r("-w /etc/passwd -p rwa -k other"), &want));
        assert!(!covers(&r("-w /etc/passwd -p w"), &want));
        let want = r("-a always,exit -F arch=b64 -S init_module -S delete_module -k modules");
        assert!(covers(
            &r("-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k m"),
            &want
        ));
        assert!(!covers(
            &r("-a always,exit -F arch=b32 -S init_module,delete_module -k modules"),
            &want
        ));
    }

    #[test]
    fn controls_and_errors() {
        assert_eq!(r("-e 2"), Rule::Control("-e".into(), "2".into()));
        assert_eq!(
            r("--backlog_wait_time 60000"),
            Rule::Control("--backlog_wait_time".into(), "60000".into())
        );
        assert!(parse_rule("-w").is_err());
        assert!(parse_rule("-x foo").is_err());
        assert_eq!(parse_rule("# comment").unwrap(), None);
    }

    #[test]
    fn offline_rules_d_count_and_immutable() {
        use crate::scan::outcome::Status;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/audit/rules.d")).unwrap();
        // Debian 12's stock rules.d/audit.rules.
        std::fs::write(
            d.path().join("etc/audit/rules.d/audit.rules"),
            "## First rule - delete all\n-D\n\n## Increase the buffers\n-b 8192\n--backlog_wait_time 60000\n-f 1\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let count = AuditRuleCheck {
            rule: None,
            min_count: Some(50),
            immutable: None,
        };
        assert_eq!(count.eval(&t).status, Status::Fail);
        let imm = AuditRuleCheck {
            rule: None,
            min_count: None,
            immutable: Some(true),
        };
        assert_eq!(imm.eval(&t).status, Status::Fail);
        let mut rules = String::new();
        for i in 0..50 {
            rules.push_str(&format!("-w /etc/f{i} -p wa -k k\n"));
        }
        rules.push_str("-e 2\n");
        std::fs::write(d.path().join("etc/audit/rules.d/50-x.rules"), rules).unwrap();
        assert_eq!(count.eval(&t).status, Status::Pass);
        assert_eq!(imm.eval(&t).status, Status::Pass);
        let one = AuditRuleCheck {
            rule: Some("-w /etc/f7 -p w".into()),
            min_count: None,
            immutable: None,
        };
        let o = one.eval(&t);
        assert_eq!(o.status, Status::Pass);
        assert!(o.evidence[0].contains("50-x.rules:8"), "{o:?}");
    }
}

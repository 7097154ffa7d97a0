//! `pg_setting`: effective PostgreSQL settings. Offline: every cluster's
//! postgresql.conf (Debian keeps them as /etc/postgresql/VERSION/NAME/)
//! with its `include`, `include_if_exists` and `include_dir` files read
//! where they appear, then the data directory's postgresql.auto.conf,
//! the last setting winning, as the server reads them. Live: `SHOW ALL`
//! through psql as the postgres user. Booleans compare as on/off.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct PgSettingCheck {
    #[serde(deserialize_with = "deserialize_expect_map")]
    pub settings: Vec<(String, Expect)>,
}

/// The output of `sql` run as postgres on a live target.
/// (psql over the local socket, peer authentication, no psqlrc,
/// unaligned and tab-separated, stopping at the first error.)
pub fn psql(t: &Target, sql: &str) -> Result<String, String> {
    t.stdout(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            "psql",
            "-XAt",
            "-v",
            "ON_ERROR_STOP=1",
            "-F",
            "\t",
            "-c",
            sql,
        ],
    )
}

/// One line of a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    Set(String, String),
    Include(String),
    IncludeIfExists(String),
    IncludeDir(String),
}

/// Parse postgresql.conf syntax: `name = value` or `name value`, `#`
/// comments, single-quoted values with `''` or `\'` for a quote.
/// Errors carry the 1-based line.
pub fn parse_conf(text: &str) -> Result<Vec<(usize, Directive)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err((n, format!("expected a setting name, found {line:?}")));
        }
        let mut rest = line[name_end..].trim_start();
        rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        let (value, tail) = if let Some(q) = rest.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices().peekable();
            let mut end = None;
            while let Some((idx, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            v.push(e);
                        }
                    }
                    '\'' if chars.peek().map(|(_, c)| *c) == Some('\'') => {
                        chars.next();
                        v.push('\'');
                    }
                    '\'' => {
                        end = Some(idx + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let Some(end) = end else {
                return Err((n, format!("{name}: unterminated quoted value")));
            };
            (v, q[end..].trim())
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '#')
                .unwrap_or(rest.len());
            (rest[..end].to_string(), rest[end..].trim())
        };
        if value.is_empty() && !rest.starts_with('\'') {
            return Err((n, format!("{name}: no value")));
        }
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err((n, format!("{name}: unexpected {tail:?} after the value")));
        }
        let d = match name.to_ascii_lowercase().as_str() {
            "include" => Directive::Include(value),
            "include_if_exists" => Directive::IncludeIfExists(value),
            "include_dir" => Directive::IncludeDir(value),
            lower => Directive::Set(lower.to_string(), value),
        };
        out.push((n, d));
    }
    Ok(out)
}

/// The effective settings of one cluster: value and `file:line`.
pub type Settings = BTreeMap<String, (String, String)>;

/// How deep includes may nest (PostgreSQL stops at 10).
const MAX_DEPTH: usize = 10;

fn read_into(t: &Target, path: &str, depth: usize, s: &mut Settings) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path}: includes nest deeper than {MAX_DEPTH}"));
    }
    let text = t.read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let abs = |p: &str| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{dir}/{p}")
        }
    };
    let lines = parse_conf(&text).map_err(|(l, why)| format!("{path}:{l}: {why}"))?;
    for (n, d) in lines {
        match d {
            Directive::Set(k, v) => {
                s.insert(k, (v, format!("{path}:{n}")));
            }
            Directive::Include(p) => read_into(t, &abs(&p), depth + 1, s)?,
            Directive::IncludeIfExists(p) => {
                if t.exists(&abs(&p)) {
                    read_into(t, &abs(&p), depth + 1, s)?;
                }
            }
            Directive::IncludeDir(p) => {
                let d = abs(&p);
                let mut names: Vec<String> = t
                    .list_dir(&d)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
                    .collect();
                // The server sorts by name in the C locale.
                names.sort();
                for n in names {
                    read_into(t, &format!("{d}/{n}"), depth + 1, s)?;
                }
            }
        }
    }
    Ok(())
}

/// Every cluster's configuration file, and its effective settings.
pub fn clusters(t: &Target) -> Result<Vec<(String, Settings)>, String> {
    let mut out = Vec::new();
    let files = t
        .glob("/etc/postgresql/*/*/postgresql.conf")
        .map_err(|e| e.to_string())?;
    for f in files {
        let mut s = Settings::new();
        read_into(t, &f, 0, &mut s)?;
        if let Some((data, _)) = s.get("data_directory").cloned() {
            let auto = format!("{}/postgresql.auto.conf", data.trim_end_matches('/'));
            if t.exists(&auto) {
                read_into(t, &auto, 1, &mut s)?;
            }
        }
        out.push((f, s));
    }
    Ok(out)
}

/// A value as `SHOW` prints it: booleans as on/off.
fn canonical(v: &str) -> String {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => "on".into(),
        "off" | "false" | "no" => "off".into(),
        _ => v.to_string(),
    }
}

impl PgSettingCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.settings.is_empty() {
            return Err("name at least one setting".into());
        }
        for (k, e) in &self.settings {
            e.validate().map_err(|why| format!("{k}: {why}"))?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .settings
            .iter()
            .map(|(k, e)| format!("{k} {}", e.describe()))
            .collect();
        format!("postgresql: {}", parts.join(", "))
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let mut f = Findings::new();
        if t.is_live() {
            let out = match psql(t, "SHOW ALL") {
                Ok(o) => o,
                Err(e) => return Outcome::error(e),
            };
            let pairs = |out: &str| -> Vec<(String, String)> {
                out.lines()
                    .filter_map(|l| {
                        let mut p = l.split('\t');
                        Some((p.next()?.to_string(), p.next()?.to_string()))
                    })
                    .collect()
            };
            let mut show: BTreeMap<String, String> = pairs(&out).into_iter().collect();
            // SHOW reports the TCP settings of the connection asking, and
            // psql asks over the local socket (0 there): read the server's
            // value for those.
            let tcp = psql(
                t,
                "SELECT name, reset_val FROM pg_settings WHERE name LIKE 'tcp\\_%'",
            );
            match tcp {
                Ok(o) => show.extend(pairs(&o)),
                Err(e) => return Outcome::error(e),
            }
            for (k, e) in &self.settings {
                let v = show.get(&k.to_ascii_lowercase()).map(|v| canonical(v));
                match e.test(v.as_deref()) {
                    Ok(()) => f.ok(format!("SHOW {k}: {}", v.unwrap_or_default())),
                    Err(why) => f.bad(format!("SHOW {k}: {why}")),
                }
            }
            return f.finish();
        }
        let clusters = match t.fact("pg.clusters", || clusters(t)).as_ref().clone() {
            Ok(c) => c,
            Err(e) => return Outcome::error(e),
        };
        if clusters.is_empty() {
            return Outcome::fail("no PostgreSQL cluster under /etc/postgresql");
        }
        for (file, s) in &clusters {
            for (k, e) in &self.settings {
                let found = s.get(&k.to_ascii_lowercase());
                let v = found.map(|(v, _)| canonical(v));
                let at = found.map(|(_, at)| at.as_str()).unwrap_or(file);
                match e.test(v.as_deref()) {
                    Ok(()) => f.ok(format!(
                        "{at}: {k} = {}",
                        v.as_deref().unwrap_or("(default)")
                    )),
                    Err(why) => f.bad(format!("{at}: {k} {why}")),
                }
            }
        }
        f.finish()
    }
}

crate::register_kind!("pg_setting", PgSettingCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::check::parse_check;
    use crate::scan::outcome::Status;
    use std::fs;

    #[test]
    fn the_conf_syntax_and_its_errors() {
        let d = parse_conf(
            "# c\nssl = on\nlog_line_prefix = '%m [%p] it''s %q'  # note\nshared_preload_libraries 'pgaudit'\ninclude_dir 'conf.d'\n",
        )
        .unwrap();
        assert_eq!(d[0], (2, Directive::Set("ssl".into(), "on".into())));
        assert_eq!(
            d[1],
            (
                3,
                Directive::Set("log_line_prefix".into(), "%m [%p] it's %q".into())
            )
        );
        assert_eq!(d[3], (5, Directive::IncludeDir("conf.d".into())));
        assert_eq!(parse_conf("a = 'open\n").unwrap_err().0, 1);
        assert_eq!(parse_conf("ok = 1\n= 2\n").unwrap_err().0, 2);
        assert_eq!(parse_conf("x = 1 2\n").unwrap_err().0, 1);
    }

    #[test]
    fn includes_are_read_in_place_and_the_last_setting_wins() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("etc/postgresql/15/main");
        fs::create_dir_all(c.join("conf.d")).unwrap();
        fs::create_dir_all(d.path().join("var/lib/postgresql/15/main")).unwrap();
        fs::write(
            c.join("postgresql.conf"),
            "data_directory = '/var/lib/postgresql/15/main'\nssl = off\npassword_encryption = md5\ninclude_dir = 'conf.d'\nlog_connections = off\n",
        )
        .unwrap();
        fs::write(
            c.join("conf.d/50-a.conf"),
            "ssl = true\nlog_connections = on\n",
        )
        .unwrap();
        fs::write(
            c.join("conf.d/60-b.conf"),
            "password_encryption = 'scram-sha-256'\n",
        )
        .unwrap();
        let check = parse_check(
            "pg_setting: { ssl: 'on', password_encryption: scram-sha-256, log_connections: 'on' }",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let o = check.eval(&t);
        // log_connections is set again after the include_dir.
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(
            o.evidence.iter().any(|e| e.contains("postgresql.conf:5")),
            "{o:?}"
        );
        fs::write(
            d.path()
                .join("var/lib/postgresql/15/main/postgresql.auto.conf"),
            "log_connections = 'on'\n",
        )
        .unwrap();
        let o = check.eval(&Target::root(d.path()).unwrap());
        assert_eq!(o.status, Status::Pass, "{o:?}");
        // A loop of includes ends in an error, not a hang.
        fs::write(c.join("conf.d/70-loop.conf"), "include '70-loop.conf'\n").unwrap();
        let o = check.eval(&Target::root(d.path()).unwrap());
        assert_eq!(o.status, Status::Error, "{o:?}");
    }
}
